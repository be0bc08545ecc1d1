import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton can only interpret here, and triton.jit reads this when a kernel (its own
    os.environ.setdefault("TRITON_INTERPRET", "1")  # library's too) is defined: before anything imports triton


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """torch's OpenMP threads busy-wait: on a shared 2-core machine one thread is much faster."""
    torch.set_num_threads(1)
