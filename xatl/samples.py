"""The sample donor and its text: stories260K (llama2.c's pretrained TinyStories model, 260K
parameters) with its 512-token tokenizer, and TinyStories text to train the converted model on.

`sample_files(data_dir)` finds them in a local data folder laid out as the project's shared data is
(`stories260K/stories260K.bin`, `stories260K/tok512.bin`, `tinystories_val_subset/tinystories_val.txt`),
and otherwise downloads them from the Hugging Face hub into its cache: `karpathy/tinyllamas` for
the model and tokenizer, the dataset `roneneldan/TinyStories` for the text. Offline and without
the files, it raises `SampleUnavailable` with what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleFile:
    role: str
    local: str  # path under a data folder
    repo_id: str  # where it lies on the hub
    filename: str
    repo_type: str = "model"

    @property
    def url(self) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"https://huggingface.co/{prefix}{self.repo_id}/blob/main/{self.filename}"


SAMPLE_FILES = (
    SampleFile("donor", "stories260K/stories260K.bin", "karpathy/tinyllamas", "stories260K/stories260K.bin"),
    SampleFile("tokenizer", "stories260K/tok512.bin", "karpathy/tinyllamas", "stories260K/tok512.bin"),
    SampleFile("text", "tinystories_val_subset/tinystories_val.txt", "roneneldan/TinyStories",
               "TinyStories-valid.txt", repo_type="dataset"),
)


class SampleUnavailable(FileNotFoundError):
    """A sample file is neither in the data folder nor downloadable (offline, hub unreachable)."""


def sample_files(data_dir: str | Path | None = None, *, download: bool = True,
                 roles: tuple[str, ...] = ("donor", "tokenizer", "text"),
                 endpoint: str | None = None, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """`{"donor": …, "tokenizer": …, "text": …}`: local paths of the sample files.

    Each is taken from `data_dir` when it is there, else downloaded (with `download`) from the hub
    (`endpoint`, default huggingface.co or `HF_ENDPOINT`) into its cache (`cache_dir`, default the
    hub's own).
    """
    found: dict[str, Path] = {}
    for sample in SAMPLE_FILES:
        if sample.role not in roles:
            continue
        local = Path(data_dir) / sample.local if data_dir is not None else None
        if local is not None and local.is_file():
            found[sample.role] = local
        elif download:
            found[sample.role] = _download(sample, data_dir, endpoint, cache_dir)
        else:
            raise SampleUnavailable(f"{local or sample.local} is missing and downloads are off")
    return found


def _download(sample: SampleFile, data_dir, endpoint: str | None, cache_dir) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import logging as hub_logging

    where = Path(data_dir) / sample.local if data_dir is not None else Path("<data folder>") / sample.local
    advice = (f"Offline? Download {sample.url} on a machine that is online, put it at {where} and point "
              "XATL_DATA_DIR (or --data-dir) at that folder")
    reason = _unreachable(endpoint or constants.ENDPOINT)
    if reason is None:
        hub_logging.set_verbosity_error()  # its retry warnings would bury the one message that matters
        try:
            return Path(hf_hub_download(sample.repo_id, sample.filename, repo_type=sample.repo_type,
                                        endpoint=endpoint, cache_dir=cache_dir))
        except Exception as error:  # HTTP errors, a proxy, a full disk: all end in the same advice
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise SampleUnavailable(f"the sample {sample.role} ({sample.filename}) is not under {where.parent} and could "
                            f"not be downloaded from {sample.repo_id} on the Hugging Face hub: {reason}. {advice}")


def _unreachable(endpoint: str, timeout: float = 10.0) -> str | None:
    """Why the hub cannot be reached, or None: one request, no retries, so that offline fails in seconds."""
    import httpx

    try:
        httpx.head(endpoint, timeout=timeout)
    except httpx.HTTPError as error:
        return f"{endpoint} is unreachable ({type(error).__name__}: {error})"
    return None


__all__ = ["SAMPLE_FILES", "SampleFile", "SampleUnavailable", "sample_files"]
