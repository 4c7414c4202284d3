"""Time grids, ODE/SDE step kernels with exact log-probs, rollout structures. Imports nothing of flowalign."""
from .kernels import NoiseSchedule, StepOutput, cps, dance, ddim, flow_grpo, kl_to_reference, step, zero
from .ode import euler_ode
from .rollout import Node, Rollout, Step, run_plan
from .stochastic_adams import awm_grid, sa_solver
from .structures import branches, independent, linear_depth_noise, singular, tree
from .timegrid import from_scheduler_config, shifted_linspace
from .windows import WindowSchedule

__all__ = ["NoiseSchedule", "StepOutput", "step", "kl_to_reference", "zero", "flow_grpo", "dance", "cps", "ddim",
           "euler_ode", "sa_solver", "awm_grid", "Node", "Step", "Rollout", "run_plan", "independent", "branches",
           "singular", "tree", "linear_depth_noise", "from_scheduler_config", "shifted_linspace", "WindowSchedule"]
