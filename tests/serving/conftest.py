import pytest
import torch
from serving_fixtures import build_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine the threads
    spin against each other (a decode step ran 10x slower with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
