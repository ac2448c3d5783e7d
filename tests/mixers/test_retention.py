"""RetentionMixer: chunked == recurrent (outputs and grads), decoding, padding, options, the model
round trip, and the transfer from a donor's attention (which GatedLinearAttention inherits)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import xatl
from xatl.config import XatlConfig
from xatl.mixers.attention import Attention
from xatl.mixers.retention import RetentionMixer

HIDDEN, HEADS, HEAD_DIM = 32, 4, 8


def tiny_config(layer_mixers=("retention",), options=None, **overrides) -> XatlConfig:
    settings = dict(vocab_size=97, hidden_size=HIDDEN, intermediate_size=48, num_attention_heads=HEADS,
                    num_key_value_heads=2)
    mixer_options = {"retention": options} if options else None
    return XatlConfig(**{**settings, **overrides}, num_hidden_layers=len(layer_mixers),
                      layer_mixers=list(layer_mixers), mixer_options=mixer_options)


def make_mixer(dtype=torch.float64, seed=0, **options) -> RetentionMixer:
    torch.manual_seed(seed)
    mixer = RetentionMixer(tiny_config(options=options), 0).to(dtype)
    with torch.no_grad():  # a trained-looking norm, so that its weight shows in the checks
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


@pytest.mark.parametrize("length", [1, 37, 70], ids=lambda n: f"T{n}")
def test_chunked_forward_equals_token_by_token_outputs_and_grads(length):
    mixer = make_mixer()
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


def test_prefill_then_steps_equals_one_forward_with_a_float32_state():
    mixer = make_mixer(torch.float32)
    x = torch.randn(3, 20, HIDDEN)
    positions = torch.arange(20)[None].expand(3, -1)
    whole, _ = mixer(x, position_ids=positions)
    prefill, state = mixer(x[:, :9], position_ids=positions[:, :9], use_cache=True)
    stepped, state = run_steps(mixer, x[:, 9:], positions[:, 9:], state=state)
    torch.testing.assert_close(torch.cat([prefill, stepped], 1), whole)
    assert state["recurrent_state"].shape == (3, HEADS, HEAD_DIM, HEAD_DIM)
    assert state["recurrent_state"].dtype == torch.float32


def test_left_padding_leaves_the_state_untouched():
    mixer = make_mixer()
    alone = torch.randn(1, 6, HIDDEN, dtype=torch.float64)
    other = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    batch = torch.cat([torch.cat([torch.randn(1, 3, HIDDEN, dtype=torch.float64), alone], 1), other])
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out, state = mixer(batch, position_ids=positions, attention_mask=mask, use_cache=True)
    expected, expected_state = mixer(alone, position_ids=torch.arange(6)[None], use_cache=True)
    torch.testing.assert_close(out[:1, 3:], expected)
    torch.testing.assert_close(state["recurrent_state"][:1], expected_state["recurrent_state"])
    # decoding on: the mask grows by one real token per step
    nxt = torch.randn(2, 2, HIDDEN, dtype=torch.float64)
    grown = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1)
    stepped, _ = run_steps(mixer, nxt, positions[:, -1:] + torch.tensor([[1, 2]]), grown, state)
    expected_steps, _ = run_steps(mixer, nxt[:1], torch.tensor([[6, 7]]), state=expected_state)
    torch.testing.assert_close(stepped[:1], expected_steps)


def test_rotary_makes_outputs_depend_on_relative_positions_only():
    mixer = make_mixer()
    x = torch.randn(2, 12, HIDDEN, dtype=torch.float64)
    positions = torch.arange(12)[None].expand(2, -1)
    out, _ = mixer(x, position_ids=positions)
    shifted, _ = mixer(x, position_ids=positions + 7)
    stretched, _ = mixer(x, position_ids=positions * 3)
    torch.testing.assert_close(shifted, out, rtol=1e-5, atol=1e-5)  # angles are float32
    assert (stretched - out).abs().max() > 1e-2
    assert mixer(x)[0].equal(out)  # no position_ids and no state: positions start at 0
    unrotated = make_mixer(use_rope=False)
    torch.testing.assert_close(unrotated(x, position_ids=positions * 3)[0], unrotated(x)[0])


def test_rotary_follows_the_donor_or_covers_the_whole_head():
    donor_rotary = RetentionMixer(tiny_config(partial_rotary_factor=0.5, rope_theta=500.0), 0)
    assert (donor_rotary.rotary_dim, donor_rotary.rope_theta) == (HEAD_DIM // 2, 500.0)
    learned = RetentionMixer(tiny_config(position_embedding_type="learned"), 0)
    assert learned.use_rope and (learned.rotary_dim, learned.rope_theta) == (HEAD_DIM, 10000.0)


def test_continuing_from_a_state_needs_position_ids():
    mixer = make_mixer()
    _, state = mixer(torch.randn(1, 4, HIDDEN, dtype=torch.float64), use_cache=True)
    with pytest.raises(ValueError, match="position_ids"):
        mixer(torch.randn(1, 1, HIDDEN, dtype=torch.float64), state=state)


def test_heads_decay_from_one_minus_two_to_the_minus_five_to_minus_nine():
    gammas = make_mixer().log_decay(torch.zeros(1, 3, HIDDEN, dtype=torch.float64))[0, 0].exp()
    torch.testing.assert_close(gammas[[0, -1]], torch.tensor([1 - 2**-5, 1 - 2**-9], dtype=torch.float64))
    assert (gammas.diff() > 0).all()


@pytest.mark.parametrize("length", [1, 3], ids=["step", "chunk"])
def test_padded_tokens_leave_a_carried_state_untouched(length):
    mixer = make_mixer()
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
        ({"num_heads": 0}, "num_heads"),
        ({"head_dim": 2.5}, "head_dim"),
        ({"value_head_dim": True}, "value_head_dim"),
        ({"use_rope": "yes"}, "use_rope"),
        ({"decay_range": [9, 5]}, "decay_range"),
        ({"decay_range": [0, 5]}, "decay_range"),
        ({"decay_range": 5}, "decay_range"),
        ({"decay": "vector"}, "unknown option"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_options_raise_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(options=options)


@pytest.mark.parametrize("plan", [("retention", "attention"), ("attention", "retention", "retention")],
                         ids=lambda p: "-".join(p))
def test_hybrid_model_save_load_generate_round_trip(tmp_path, plan):
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config(plan)).eval()
    ids = torch.randint(3, 97, (2, 12))
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    generated = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, 18)
    full = loaded(generated).logits  # greedy decoding agrees with re-running the whole sequence
    assert torch.equal(full[:, 11:-1].argmax(-1), generated[:, 12:])


def donor_attention(config: XatlConfig, seed=1) -> Attention:
    torch.manual_seed(seed)
    donor = XatlConfig(**{**config.to_dict(), "layer_mixers": None, "mixer_options": None})
    return Attention(donor, 0).double()


def load_assignments(mixer, assignments):
    with torch.no_grad():
        for a in assignments:
            mixer.get_parameter(a.param).copy_(a.value)


@pytest.mark.parametrize("mixer_name", ["retention", "gla"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_transfer_copies_o_proj_and_maps_qkv_over_grouped_heads(mixer_name, kv_heads):
    config = tiny_config([mixer_name], num_key_value_heads=kv_heads, attention_bias=True, attention_out_bias=True)
    attention = donor_attention(config)
    weights = {name: t.detach() for name, t in attention.state_dict().items()}
    mixer = xatl.XatlForCausalLM(config).model.layers[0].mixer

    without_qkv = {a.param: a for a in mixer.init_from_attention(weights, config, include_qkv=False)}
    assert set(without_qkv) == {"o_proj.weight", "o_proj.bias"}
    assignments = {a.param: a for a in mixer.init_from_attention(weights, config, include_qkv=True)}
    load_assignments(mixer, assignments.values())
    assert set(assignments) == {f"{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                                for kind in ("weight", "bias")}
    for name, a in assignments.items():
        assert a.sources == [name]
        groups = HEADS // kv_heads if name.startswith(("k_proj", "v_proj")) else 1
        assert a.kind == ("copied" if groups == 1 else "initialised"), name
        expected = weights[name].unflatten(0, (-1, HEAD_DIM)).repeat_interleave(groups, 0).flatten(0, 1)
        assert torch.equal(mixer.get_parameter(name), expected), name
        if a.kind == "copied":
            assert torch.equal(mixer.get_parameter(name), weights[name]), name


@pytest.mark.parametrize("mixer_name", ["retention", "gla"])
def test_first_token_with_copied_qkv_is_the_donor_attention_value_normalised(mixer_name):
    # At the first token softmax attention returns v_0 per head; a linear mixer returns
    # (q_0·k_0 / √d) v_0, which the per-head RMSNorm turns into sign(q_0·k_0) v_0 / rms(v_0)
    # (no decay has acted yet, position 0 is unrotated; a negligible norm epsilon makes the
    # scale drop out exactly). Then the gate and the copied W_O.
    config = tiny_config([mixer_name], norm_eps=1e-12)
    attention = donor_attention(config)
    weights = {name: t.detach() for name, t in attention.state_dict().items()}
    mixer = xatl.XatlForCausalLM(config).model.layers[0].mixer.double()
    load_assignments(mixer, mixer.init_from_attention(weights, config, include_qkv=True))

    x = torch.randn(3, 4, HIDDEN, dtype=torch.float64)
    heads = {}
    attention.o_proj.register_forward_hook(lambda module, args, out: heads.setdefault("out", args[0]))
    attention(x)
    values = heads["out"][:, 0].unflatten(-1, (HEADS, HEAD_DIM))  # (B, H, hd): the attention's v_0
    q = F.linear(x[:, 0], weights["q_proj.weight"]).unflatten(-1, (HEADS, HEAD_DIM))
    k = F.linear(x[:, 0], weights["k_proj.weight"]).unflatten(-1, (2, HEAD_DIM)).repeat_interleave(2, 1)
    sign = (q * k).sum(-1, keepdim=True).sign()
    normalised = sign * values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True))
    gate = F.silu(mixer.g_proj(x[:, 0])).unflatten(-1, (HEADS, HEAD_DIM))
    expected = F.linear((normalised * mixer.o_norm.weight * gate).flatten(1), weights["o_proj.weight"])
    torch.testing.assert_close(mixer(x)[0][:, 0], expected)


def test_transfer_refuses_shapes_that_cannot_map():
    config = tiny_config(options={"num_heads": 2})
    weights = {name: t.detach() for name, t in donor_attention(config).state_dict().items()}
    with pytest.raises(ValueError, match="num_heads"):
        RetentionMixer(config, 0).init_from_attention(weights, config, include_qkv=False)
    config = tiny_config(options={"head_dim": 4})
    mixer = RetentionMixer(config, 0)
    assert len(mixer.init_from_attention(weights, config, include_qkv=False)) == 1
    with pytest.raises(ValueError, match="head_dim=4"):
        mixer.init_from_attention(weights, config, include_qkv=True)
