"""Hugging Face donors: tiny random transformers models saved as safetensors, read back as donors,
rebuilt as `XatlForCausalLM`, and compared logit for logit with transformers' own forward."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from xatl.donors import load_donor
from xatl.model import XatlForCausalLM

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, **SMALL)
NEOX_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  rotary_pct=0.25, rotary_emb_base=1000, **SMALL)

CASES = {
    "gpt2-tied": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=24, **SMALL)),
    "gpt2-untied-n_inner-gelu": lambda: GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=24, n_inner=40, activation_function="gelu",
        tie_word_embeddings=False, **SMALL)),
    "neox-parallel-partial-rotary": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**NEOX_SHAPE)),
    "neox-sequential-tied": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        **NEOX_SHAPE, use_parallel_residual=False, tie_word_embeddings=True)),
    "llama-gqa-untied": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE)),
    "llama-tied-head_dim-bias": lambda: LlamaForCausalLM(LlamaConfig(
        **LLAMA_SHAPE, head_dim=12, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "qwen2-bias-tied": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_SHAPE, tie_word_embeddings=True)),
    "qwen2-bias-untied": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_SHAPE)),
    "mistral-no-window": lambda: MistralForCausalLM(MistralConfig(**LLAMA_SHAPE, sliding_window=None)),
}


def randomize(model, seed=0):
    """Large random weights everywhere (norms and biases included), so that a tensor put in the
    wrong place changes the logits far beyond the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3 + (1.0 if param.ndim == 1 else 0.0))
    return model.eval()


def token_ids(batch=2, length=20, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rebuild(donor):
    model = XatlForCausalLM(donor.config).eval()
    model.load_state_dict(donor.state_dict, strict=True)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_donor_rebuilds_transformers_logits(case, tmp_path):
    reference = randomize(CASES[case]())
    reference.save_pretrained(tmp_path)
    donor = load_donor(str(tmp_path))
    assert donor.model_type == reference.config.model_type
    assert donor.config.tie_word_embeddings == reference.config.tie_word_embeddings
    ids = token_ids()
    with torch.no_grad():
        expected = reference(ids).logits
        actual = rebuild(donor)(ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    reference = randomize(LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE)))
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    donor = load_donor(str(tmp_path))
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(rebuild(donor)(ids, use_cache=False).logits, reference(ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_gpt2_base_model_checkpoint_with_mask_buffers(tmp_path):
    """The hub's `gpt2` stores the base model's names ("h.0.attn.c_attn.weight", no "transformer.")
    and the causal-mask buffers; both are read."""
    reference = randomize(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=24, **SMALL)))
    tensors = {name.removeprefix("transformer."): t.clone() for name, t in reference.state_dict().items()
               if name != "lm_head.weight"}
    for layer in range(2):
        tensors[f"h.{layer}.attn.bias"] = torch.ones(1, 1, 24, 24).tril()
        tensors[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reference.config.to_json_file(tmp_path / "config.json")
    donor = load_donor(str(tmp_path))
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(rebuild(donor)(ids, use_cache=False).logits, reference(ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert donor.origins["model.embed_tokens.weight"] == "wte.weight"


def test_origins_name_the_checkpoint_tensor_and_transform(tmp_path):
    randomize(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=24, **SMALL))).save_pretrained(
        tmp_path / "gpt2")
    randomize(GPTNeoXForCausalLM(GPTNeoXConfig(**NEOX_SHAPE))).save_pretrained(tmp_path / "neox")
    gpt2, neox = load_donor(str(tmp_path / "gpt2")), load_donor(str(tmp_path / "neox"))
    k_proj = "transformer.h.1.attn.c_attn.weight[:, 32:64] transposed"
    assert gpt2.origins["model.layers.1.mixer.k_proj.weight"] == k_proj
    assert gpt2.origins["model.layers.1.mixer.v_proj.bias"] == "transformer.h.1.attn.c_attn.bias[64:96]"
    assert gpt2.origins["model.layers.0.mlp.up_proj.weight"] == "transformer.h.0.mlp.c_fc.weight transposed"
    assert gpt2.origins["lm_head.weight"] == "transformer.wte.weight (tied)"
    assert (neox.origins["model.layers.0.mixer.q_proj.weight"]
            == "gpt_neox.layers.0.attention.query_key_value.weight rows as (heads=4, 3, head_dim=16)[:, 0]")
    assert neox.origins["lm_head.weight"] == "embed_out.weight"
    assert set(gpt2.origins) == set(gpt2.state_dict) and set(neox.origins) == set(neox.state_dict)
    assert torch.equal(gpt2.state_dict["lm_head.weight"], gpt2.state_dict["model.embed_tokens.weight"])


def test_config_carries_the_family_settings(tmp_path):
    randomize(GPTNeoXForCausalLM(GPTNeoXConfig(**NEOX_SHAPE))).save_pretrained(tmp_path)
    config = load_donor(str(tmp_path)).config
    assert (config.norm_type, config.mlp_type, config.hidden_act) == ("layernorm", "plain", "gelu")
    assert (config.position_embedding_type, config.rotary_dim, config.rope_theta) == ("rotary", 4, 1000.0)
    assert config.parallel_residual and config.attention_bias and config.attention_out_bias
    assert (config.bos_token_id, config.eos_token_id, config.vocab_size) == (1, 2, VOCAB)
    assert config.layer_mixers == ["attention", "attention"]


def test_dtype_kept_unless_given(tmp_path):
    randomize(LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE))).half().save_pretrained(tmp_path)
    kept = load_donor(str(tmp_path))
    assert {t.dtype for t in kept.state_dict.values()} == {torch.float16} and kept.config.dtype == torch.float16
    cast = load_donor(str(tmp_path), dtype="bfloat16")
    assert {t.dtype for t in cast.state_dict.values()} == {torch.bfloat16} and cast.config.dtype == torch.bfloat16
    torch.testing.assert_close(cast.state_dict["model.norm.weight"].float(),
                               kept.state_dict["model.norm.weight"].float(), rtol=1e-2, atol=1e-2)


def test_tokenizer_beside_the_weights_is_loaded(tmp_path):
    randomize(LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE))).save_pretrained(tmp_path)
    assert load_donor(str(tmp_path)).tokenizer is None
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path)
    tokenizer = load_donor(str(tmp_path)).tokenizer
    assert tokenizer("hello world nope")["input_ids"] == [3, 4, 0]


def test_donor_config_json_fields_are_what_transformers_wrote(tmp_path):
    """The reader works from config.json as written (transformers 5 puts RoPE settings under
    `rope_parameters`); the older top-level layout of hub configs reads the same."""
    randomize(GPTNeoXForCausalLM(GPTNeoXConfig(**NEOX_SHAPE))).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"]["partial_rotary_factor"] == 0.25
    old_style = {k: v for k, v in written.items() if k != "rope_parameters"}
    old_style.update(rotary_pct=0.25, rotary_emb_base=1000, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(old_style))
    config = load_donor(str(tmp_path)).config
    assert (config.partial_rotary_factor, config.rope_theta) == (0.25, 1000.0)


def test_token_ids_outside_the_vocabulary_are_dropped(tmp_path):
    randomize(LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(pad_token_id=-1, eos_token_id=[2, 5000], bos_token_id=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps(config))
    donor_config = load_donor(str(tmp_path)).config
    assert (donor_config.pad_token_id, donor_config.eos_token_id, donor_config.bos_token_id) == (None, [2], None)
