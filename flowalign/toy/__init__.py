"""The embedded toy world: real tiny models trained here on data that ships inside packages."""
