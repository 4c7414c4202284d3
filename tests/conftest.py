import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two threads on the 2-core CI machines; OMP_NUM_THREADS wins (1 when other jobs share the cores).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def toy_generator():
    """The shipped toy digits model (no training: the weights ship in the repo)."""
    import flowalign

    return flowalign.load_generator("toy/digits", device="cpu")
