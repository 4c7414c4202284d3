"""Reward models for flowalign: the protocol, the registry, built-in and plug-in rewards.

Imports nothing of flowalign, so reward plug-ins depend on this package alone.
"""
from .base import CompositeReward, InputSpec, Reward
from .registry import RewardError, available, load, load_weighted

__all__ = ["Reward", "CompositeReward", "InputSpec", "RewardError", "available", "load", "load_weighted"]
