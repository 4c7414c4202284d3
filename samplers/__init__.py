"""Time grids, ODE/SDE step kernels with exact log-probs, rollout structures. Imports nothing of flowalign."""
from .ode import euler_ode

__all__ = ["euler_ode"]
