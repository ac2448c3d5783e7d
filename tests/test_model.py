"""XatlConfig validation and XatlForCausalLM behaviour that holds for every mixer plan."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import xatl
from xatl.config import XatlConfig


def tiny_config(**overrides) -> XatlConfig:
    settings = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return XatlConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hidden_size=30), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(mlp_type="moe"), "mlp_type"),
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
        (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
        (dict(layer_mixers=["attention"]), "layer_mixers"),
        (dict(layer_mixers=["attention", "transformer-xl"]), "unknown mixer"),
        (dict(mixer_options={"mamba2": {}}), "not used by any layer"),
        (dict(mixer_options={"attention": {"window": 4}}), "unknown option"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_config_rejects_bad_values_with_a_named_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trips_through_auto_config(tmp_path):
    config = tiny_config(position_embedding_type="learned", parallel_residual=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, XatlConfig)
    loaded_dict, saved_dict = loaded.to_dict(), config.to_dict()
    loaded_dict.pop("_name_or_path"), saved_dict.pop("_name_or_path")
    assert loaded_dict == saved_dict


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(norm_type="layernorm", mlp_type="plain", hidden_act="gelu_new", position_embedding_type="learned"),
        dict(parallel_residual=True, partial_rotary_factor=0.5, attention_bias=True, attention_out_bias=True),
        dict(tie_word_embeddings=True),
    ],
    ids=["llama-like", "gpt2-like", "neox-like", "tied"],
)
def test_save_load_generate_round_trip(tmp_path, overrides):
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config(**overrides)).eval()
    ids = torch.randint(3, 97, (2, 12))
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    generated = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 17)
    # greedy generation agrees with re-running the full sequence
    full = loaded(generated).logits
    assert torch.equal(full[:, 11:-1].argmax(-1), generated[:, 12:])


def test_step_by_step_decoding_equals_the_parallel_forward():
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 97, (2, 10))
    parallel = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    pieces = [out.logits]
    for t in range(4, 10):
        out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), parallel)
    assert out.cache.get_seq_length() == 10


def test_left_padded_batch_generates_like_each_prompt_alone():
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config()).eval()
    short, long = torch.randint(3, 97, (1, 3)), torch.randint(3, 97, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    together = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = [model.generate(p, max_new_tokens=4, do_sample=False) for p in (short, long)]
    assert torch.equal(together[0, 6:], alone[0][0, 3:])
    assert torch.equal(together[1, 6:], alone[1][0, 6:])


def test_labels_give_the_shifted_cross_entropy():
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 97, (2, 9))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_hidden_states_are_embeddings_plus_every_layer():
    model = xatl.XatlForCausalLM(tiny_config(num_hidden_layers=3)).eval()
    out = model(torch.randint(3, 97, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == 4
    assert all(h.shape == (1, 5, 32) for h in out.hidden_states)


def test_a_mixer_without_direct_parameters_still_gets_its_own_initialisation():
    """RetentionMixer keeps all its parameters in child modules; its reset_parameters (RetNet's small
    xavier, bound 2**-2.5 * sqrt(6 / (fan_in + fan_out))) must still run inside the model."""
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config(layer_mixers=["retention", "attention"]))
    q = model.model.layers[0].mixer.q_proj.weight
    bound = 2**-2.5 * (6 / sum(q.shape)) ** 0.5
    assert q.abs().max() <= bound
    assert q.abs().max() > 0.9 * bound  # uniform over the whole range, not normal(0.02)
