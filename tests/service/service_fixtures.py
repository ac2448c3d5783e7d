"""A real uvicorn server on a free loopback port, in a thread of the test process (so tests can
look at the engines behind it), serving tiny models saved in a temporary models directory."""

import httpx
import torch
from http_server import ServerThread  # noqa: F401  (the tests import it from here)
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import xatl

API_KEY = "test-key"
TEXT = ["Once upon a time there was a little girl named Lily.", "Héllo wörld 日本語 🙂 café."]


def build_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXT * 20, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model(folder, plan, tokenizer, seed=0):
    torch.manual_seed(seed)
    config = xatl.XatlConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=len(plan),
        num_attention_heads=4, num_key_value_heads=2, layer_mixers=plan,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
    )
    xatl.XatlForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def metric(server: ServerThread, name: str, **labels) -> float:
    """One sample of /metrics (0 when absent), matched on its name and labels in any order."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0
