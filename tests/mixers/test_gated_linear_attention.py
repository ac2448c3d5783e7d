"""GatedLinearAttention in both decay forms: chunked == recurrent (outputs and grads), decoding,
padding, options, the start from retention's decays, the model round trip. The transfer from
attention is RetentionMixer's and is tested with it (tests/mixers/test_retention.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import xatl
from xatl.config import XatlConfig
from xatl.mixers.gla import GatedLinearAttention
from xatl.mixers.retention import RetentionMixer

HIDDEN, HEADS, HEAD_DIM = 32, 4, 8
DECAYS = ["scalar", "vector"]


def tiny_config(layer_mixers=("gla",), options=None, **overrides) -> XatlConfig:
    settings = dict(vocab_size=97, hidden_size=HIDDEN, intermediate_size=48, num_attention_heads=HEADS,
                    num_key_value_heads=2)
    mixer_options = {"gla": options} if options else None
    return XatlConfig(**{**settings, **overrides}, num_hidden_layers=len(layer_mixers),
                      layer_mixers=list(layer_mixers), mixer_options=mixer_options)


def make_mixer(decay, dtype=torch.float64, seed=0, **options) -> GatedLinearAttention:
    """A mixer whose decay depends on its input (at init it does not: W_a = 0)."""
    torch.manual_seed(seed)
    mixer = GatedLinearAttention(tiny_config(options={"decay": decay, **options}), 0).to(dtype)
    with torch.no_grad():
        for p in mixer.gk_proj.parameters():
            p.normal_(0.0, 0.3)
        mixer.o_norm.weight.uniform_(0.5, 1.5)
    return mixer


def run_steps(mixer, x, position_ids, mask=None, state=None):
    """Feed x (B, T, hidden) one token at a time; return the outputs (B, T, hidden) and the state."""
    outs = []
    for t in range(x.shape[1]):
        seen = None if mask is None else mask[:, : mask.shape[1] - x.shape[1] + t + 1]
        out, state = mixer(x[:, t : t + 1], position_ids=position_ids[:, t : t + 1], attention_mask=seen,
                           state=state, use_cache=True)
        outs.append(out)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("length", [1, 70], ids=lambda n: f"T{n}")
def test_chunked_forward_equals_token_by_token_outputs_and_grads(decay, length):
    mixer = make_mixer(decay)
    x = torch.randn(2, length, HIDDEN, dtype=torch.float64, requires_grad=True)
    positions = torch.arange(length)[None].expand(2, -1)
    parallel, parallel_state = mixer(x, position_ids=positions, use_cache=True)
    stepped, stepped_state = run_steps(mixer, x, positions)
    torch.testing.assert_close(stepped, parallel)
    torch.testing.assert_close(stepped_state["recurrent_state"], parallel_state["recurrent_state"])

    weights = torch.randn_like(parallel)
    inputs = [x, *mixer.parameters()]
    grads_parallel = torch.autograd.grad((parallel * weights).sum(), inputs)
    grads_stepped = torch.autograd.grad((stepped * weights).sum(), inputs)
    for name, a, b in zip(["x", *dict(mixer.named_parameters())], grads_parallel, grads_stepped, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("decay", DECAYS)
def test_prefill_then_steps_equals_one_forward_with_a_float32_state(decay):
    mixer = make_mixer(decay, torch.float32)
    x = torch.randn(3, 20, HIDDEN)
    positions = torch.arange(20)[None].expand(3, -1)
    whole, _ = mixer(x, position_ids=positions)
    prefill, state = mixer(x[:, :9], position_ids=positions[:, :9], use_cache=True)
    stepped, state = run_steps(mixer, x[:, 9:], positions[:, 9:], state=state)
    torch.testing.assert_close(torch.cat([prefill, stepped], 1), whole)
    assert state["recurrent_state"].shape == (3, HEADS, HEAD_DIM, HEAD_DIM)
    assert state["recurrent_state"].dtype == torch.float32


@pytest.mark.parametrize("decay", DECAYS)
def test_left_padding_leaves_the_state_untouched(decay):
    mixer = make_mixer(decay)
    alone = torch.randn(1, 6, HIDDEN, dtype=torch.float64)
    other = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    batch = torch.cat([torch.cat([torch.randn(1, 3, HIDDEN, dtype=torch.float64), alone], 1), other])
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out, state = mixer(batch, position_ids=positions, attention_mask=mask, use_cache=True)
    expected, expected_state = mixer(alone, position_ids=torch.arange(6)[None], use_cache=True)
    torch.testing.assert_close(out[:1, 3:], expected)
    torch.testing.assert_close(state["recurrent_state"][:1], expected_state["recurrent_state"])


@pytest.mark.parametrize("decay", DECAYS)
def test_starts_as_retention_then_learns_a_data_dependent_decay(decay):
    config = tiny_config(options={"decay": decay})
    gla = xatl.XatlForCausalLM(config).model.layers[0].mixer  # the model's init, not only the mixer's
    retention = RetentionMixer(tiny_config(["retention"]), 0)
    x = torch.randn(2, 5, HIDDEN)
    expected = retention.log_decay(x)  # (B, T, H)
    got = gla.log_decay(x)
    if decay == "vector":
        assert got.shape == (2, 5, HEADS, HEAD_DIM)
        expected = expected[..., None].expand_as(got)
    torch.testing.assert_close(got, expected)
    # the decay's input weights get a gradient at once (vector: through W_2, zero at init)
    (gla.log_decay(x) * torch.randn_like(got)).sum().backward()
    first = gla.gk_proj if decay == "scalar" else gla.gk_proj[1]
    assert first.weight.grad.abs().sum() > 0


def test_decay_defaults_to_scalar_and_rotary_follows_the_donor():
    options = tiny_config().mixer_options["gla"]
    assert options["decay"] == "scalar" and options["use_rope"] is True
    assert tiny_config(position_embedding_type="learned").mixer_options["gla"]["use_rope"] is False


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("length", [1, 3], ids=["step", "chunk"])
def test_padded_tokens_leave_a_carried_state_untouched(decay, length):
    mixer = make_mixer(decay)
    _, state = mixer(torch.randn(2, 5, HIDDEN, dtype=torch.float64), use_cache=True)
    mask = torch.tensor([[1] * 5 + [0] * length, [1] * 5 + [1] * length])  # row 0: padding
    positions = torch.full((2, length), 5)
    _, after = mixer(torch.randn(2, length, HIDDEN, dtype=torch.float64), position_ids=positions,
                     attention_mask=mask, state=state, use_cache=True)
    torch.testing.assert_close(after["recurrent_state"][0], state["recurrent_state"][0], rtol=0, atol=0)
    assert not torch.equal(after["recurrent_state"][1], state["recurrent_state"][1])

@pytest.mark.parametrize(
    "options,message",
    [
        ({"decay": "matrix"}, "decay"),
        ({"gate_low_rank_dim": 0}, "gate_low_rank_dim"),
        ({"gate_logit_normalizer": -1.0}, "gate_logit_normalizer"),
        ({"num_heads": -4}, "num_heads"),
        ({"decay_range": [3]}, "decay_range"),
        ({"gate_fn": "swish"}, "unknown option"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_options_raise_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(options=options)


@pytest.mark.parametrize("decay", DECAYS)
def test_hybrid_model_save_load_generate_round_trip(tmp_path, decay):
    torch.manual_seed(0)
    config = tiny_config(("gla", "attention", "retention"), options={"decay": decay})
    model = xatl.XatlForCausalLM(config).eval()
    ids = torch.randint(3, 97, (2, 12))
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mixer_options["gla"]["decay"] == decay
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    generated = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, 18)
    full = loaded(generated).logits  # greedy decoding agrees with re-running the whole sequence
    assert torch.equal(full[:, 11:-1].argmax(-1), generated[:, 12:])
