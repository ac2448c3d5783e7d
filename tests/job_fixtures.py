"""A donor and text for the job tests: a tiny random Llama saved as a Hugging Face folder with a
byte-level BPE tokenizer, and a corpus of simple sentences it can learn in a few steps."""

import json
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
