"""A tiny byte-level BPE tokenizer (trained here, on text with multi-byte UTF-8) and tiny models
with any mixer plan, for the engine tests."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import xatl
from xatl.mixers import MIXERS

TRAINING_TEXT = [
    "Once upon a time there was a little girl named Lily.",
    "Héllo wörld, ça va? Ünïcödé façade naïve café.",
    "日本語のテキストと中文文本。",
    "Emoji: 🙂🚀✨ and more 🙂 text.",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TRAINING_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


LINEAR_MIXERS = [name for name in MIXERS if name != "attention"]


def plans() -> dict[str, list[str]]:
    """Mixer plans of three layers: all attention, each linear mixer alone, and hybrids."""
    result = {"attention": ["attention"] * 3}
    for name in LINEAR_MIXERS:
        result[name] = [name] * 3
        result[f"{name}+attention"] = [name, "attention", name]
    return result


def tiny_model(plan: list[str], vocab_size: int, seed: int = 0, **overrides) -> xatl.XatlForCausalLM:
    settings = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=len(plan),
        num_attention_heads=4, num_key_value_heads=2, layer_mixers=plan,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return xatl.XatlForCausalLM(xatl.XatlConfig(**{**settings, **overrides})).eval()
