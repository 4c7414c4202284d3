"""Modifiers: options that combine with several training methods (one file each, registered by name).

Each declares the methods (or trainer families) it combines with; any other combination is a one-line
config error. See ``flowalign.methods.base.Modifier`` for the hooks a modifier may implement.
"""
