"""Test-only start-up hook for the DeepSpeed tests (tests/test_deepspeed.py puts this folder on PYTHONPATH).

accelerate sets DeepSpeed up only over an accelerator's backend (NCCL and the like): on a CPU machine each process
comes up alone. Here it gets gloo instead, so ZeRO's partitioned optimizer runs across 2 CPU processes exactly as
it does across GPUs. DeepSpeed's shared-memory fast path for CPU collectives (a C++ extension compiled at start)
is left out: gloo carries the collectives.
"""
import os

if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
    import importlib

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def _gloo(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_CPU

    PartialState._prepare_backend = _gloo
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
