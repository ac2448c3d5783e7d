"""A donor and text for the job tests: a tiny random Llama saved as a Hugging Face folder with a
byte-level BPE tokenizer, and a corpus of simple sentences it can learn in a few steps."""

import json
import tarfile
from pathlib import Path

import torch
from training.training_fixtures import build_tokenizer, documents
from transformers import LlamaConfig, LlamaForCausalLM


def write_donor(folder: Path, *, layers: int = 2, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(path: Path, count: int = 80, seed: int = 0) -> Path:
    """`count` documents as JSON lines."""
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents(count, seed)))
    return path

JOBS_API_KEY = "jobs-test-key"  # the key of the job tests' deployments


def conversion_spec(donor_id: str, corpus_id: str, *, steps: int = 12, save_every: int = 4, **extra) -> dict:
    """A small conversion of the tiny donor to gated linear attention, trained on the corpus."""
    return {"type": "conversion", "donor": donor_id, "mixer": "gla", "transfer": "xatl+qkv",
            "training": {"training_file": corpus_id, "steps": steps, "batch_size": 4, "block_size": 16,
                         "lr": 1e-2, "valid_fraction": 0.2, "save_every": save_every, "log_every": 1},
            "evaluation": {"contexts": [8, 32], "decode_tokens": 4, "max_batches": 4}, **extra}


def upload_donor(client, donor_dir: Path, tmp_path: Path) -> dict:
    """The donor folder uploaded as a .tar.gz, as a user sends a Hugging Face model."""
    archive = tmp_path / "tiny-llama.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(donor_dir, arcname="tiny-llama")
    return client.upload(archive, purpose="donor")
