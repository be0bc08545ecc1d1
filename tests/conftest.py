import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """torch's OpenMP threads busy-wait: on a shared 2-core machine one thread is much faster."""
    torch.set_num_threads(1)
