"""Reward models for flowalign: the protocol, the registry, built-in and plug-in rewards.

Imports nothing of flowalign, so reward plug-ins depend on this package alone.
"""
from .base import CompositeReward, InputSpec, PairwiseReward, Reward, SetReward, check_finite
from .errors import RewardError
from .groupwise import GroupwiseReward
from .registry import available, load, load_weighted

__all__ = ["Reward", "PairwiseReward", "GroupwiseReward", "SetReward", "CompositeReward", "InputSpec", "RewardError",
           "available", "check_finite", "load", "load_weighted"]
