import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The donor models here are tiny: threads only add overhead, and on a busy 2-core machine
    OpenMP's waiting threads slow a forward pass down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
