import pytest
from training_fixtures import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()
