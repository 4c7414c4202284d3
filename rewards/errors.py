"""Reward errors: one line that names the reward and what it expected."""


class RewardError(Exception):
    """A reward could not be loaded, was given input it cannot take, or produced a non-finite score."""
