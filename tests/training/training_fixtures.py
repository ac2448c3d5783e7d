"""Tiny pieces for the training tests: a byte-level BPE tokenizer, a synthetic corpus the models
can learn quickly, tiny models, and a converted-model directory with a hand-written transfer report
(the shape `xatl convert` writes)."""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import xatl

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "a small bird", "the teacher"]
VERBS = ["saw", "liked", "found", "followed", "painted", "called"]
OBJECTS = ["the red ball", "a green tree", "the big house", "a blue boat", "the quiet river"]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(count)]


def documents(count: int, seed: int = 0, per_document: int = 6) -> list[str]:
    """Short paragraphs of simple sentences."""
    lines = sentences(count * per_document, seed)
    return [" ".join(lines[i * per_document:(i + 1) * per_document]) for i in range(count)]


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(sentences(200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(plan=("attention", "attention"), vocab_size: int = 300, seed: int = 0, **overrides):
    settings = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=len(plan),
        num_attention_heads=4, num_key_value_heads=2, layer_mixers=list(plan),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return xatl.XatlForCausalLM(xatl.XatlConfig(**{**settings, **overrides}))


def skeleton_names(model) -> list[str]:
    """What `xatl` transfer copies: everything outside the mixers, plus attention layers whole."""
    return [n for n, _ in model.named_parameters() if ".mixer." not in n]


def write_model_dir(path: Path, model, tokenizer, copied: list[str]) -> Path:
    """A converted-model directory: weights, tokenizer and a transfer report naming `copied`."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    tensors = [
        {"name": n, "shape": list(p.shape), "numel": p.numel(), "origin": "copied" if n in copied else "random"}
        for n, p in model.named_parameters()
    ]
    (path / "transfer_report.json").write_text(json.dumps({"mode": "xatl", "tensors": tensors}))
    return path


def corpus_blocks(tokenizer, block_size: int = 16, count: int = 60, seed: int = 0) -> list:
    """Training blocks of the synthetic corpus (a list: re-iterable, cheap)."""
    from xatl.data import TextBlocks

    texts = documents(count, seed)
    return list(TextBlocks(lambda: iter(texts), tokenizer, block_size))


def parameters(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
