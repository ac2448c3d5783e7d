import pytest
from service_fixtures import API_KEY, ServerThread, build_tokenizer, save_tiny_model

from service.config import Settings


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("models")
    save_tiny_model(folder / "tiny-gla", ["gla", "attention"], tokenizer)
    save_tiny_model(folder / "tiny-attention", ["attention", "attention"], tokenizer, seed=1)
    (folder / "not-a-model").mkdir()  # no config.json: not listed
    return folder


def settings_for(models_dir, tmp_path, **overrides) -> Settings:
    values = dict(api_keys=[API_KEY], home=tmp_path, models_dir=models_dir, max_prompt_tokens=64,
                  max_tokens=100_000, max_concurrent_streams=8, max_batch_size=4, torch_threads=1)
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    with ServerThread(settings_for(models_dir, tmp_path_factory.mktemp("data"))) as running:
        yield running


@pytest.fixture
def make_server(models_dir, tmp_path):
    """A server of its own, with settings for one test (limits, no keys, ...)."""
    def start(**overrides):
        return ServerThread(settings_for(models_dir, tmp_path, **overrides))
    return start
