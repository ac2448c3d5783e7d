"""Mamba-2 mixer: parity with transformers' Mamba2Mixer, the chunked scan against a token-by-token
reference, recurrent decoding, the model round trip, option checks and the attention transfer."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

import xatl
from xatl.config import XatlConfig
from xatl.mixers.attention import Attention
from xatl.mixers.mamba2 import Mamba2Mixer

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8


def tiny_config(mamba2=None, **overrides) -> XatlConfig:
    settings = dict(
        vocab_size=61, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, bos_token_id=1, eos_token_id=2,
        layer_mixers=["attention", "mamba2"], mixer_options={"mamba2": {"chunk_size": 8, **(mamba2 or {})}},
    )
    return XatlConfig(**{**settings, **overrides})


def make_mixer(dtype=torch.float64, seed=0, **options) -> Mamba2Mixer:
    """A mixer whose every parameter matters: D, the norm weight and the conv bias moved off their
    init, and step sizes large enough (0.3 to 1.3) that the state forgets within a chunk or two."""
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(tiny_config(options), layer_idx=1).to(dtype)
    with torch.no_grad():
        mixer.D.normal_()
        mixer.norm.weight.normal_(1.0, 0.3)
        mixer.conv1d.bias.normal_(0.0, 0.3)
        mixer.dt_bias.uniform_(-1.0, 1.0)
    return mixer


def reference_forward(mixer: Mamba2Mixer, hidden: torch.Tensor) -> torch.Tensor:
    """Mamba-2 from its equations, one token at a time: h_t = exp(dt A) h + dt x_t B_tᵀ, y_t = h_t C_t + D x_t,
    then norm(y) * silu(z) (or norm(y * silu(z)) with `norm_before_gate=False`)."""
    batch, length, _ = hidden.shape
    heads, head_dim, state_size, groups = mixer.num_heads, mixer.head_dim, mixer.state_size, mixer.n_groups
    inner = heads * head_dim
    z, xbc, dt_raw = mixer.in_proj(hidden).split([inner, mixer.conv_dim, heads], dim=-1)
    taps = mixer.conv1d.weight[:, 0].T  # (W, conv_dim)
    padded = F.pad(xbc, (0, 0, taps.shape[0] - 1, 0))  # (B, W - 1 + T, conv_dim)
    A = -mixer.A_log.exp()
    h = hidden.new_zeros(batch, heads, head_dim, state_size)
    ys = []
    for t in range(length):
        u = F.silu((padded[:, t : t + taps.shape[0]] * taps).sum(1) + mixer.conv1d.bias)
        x, B, C = u.split([inner, groups * state_size, groups * state_size], dim=-1)
        x = x.view(batch, heads, head_dim)
        B = B.view(batch, groups, state_size).repeat_interleave(heads // groups, dim=1)  # (B, H, N)
        C = C.view(batch, groups, state_size).repeat_interleave(heads // groups, dim=1)
        dt = F.softplus(dt_raw[:, t] + mixer.dt_bias)  # (B, H)
        h = (dt * A).exp()[..., None, None] * h + (dt[..., None] * x)[..., None] * B[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C) + mixer.D[:, None] * x)
    y = torch.stack(ys, dim=1).reshape(batch, length, inner)
    gate_first = not mixer.norm.norm_before_gate
    y = y * F.silu(z) if gate_first else y
    y = y.unflatten(-1, (groups, -1))
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mixer.norm.eps)).flatten(-2) * mixer.norm.weight
    return mixer.out_proj(y if gate_first else y * F.silu(z))


# 1. parity with transformers


@pytest.mark.parametrize("n_groups", [4, 2, 1], ids=lambda g: f"groups{g}")
def test_matches_transformers_mamba2_mixer_with_the_same_weights(n_groups):
    ours = make_mixer(torch.float32, n_groups=n_groups, norm_before_gate=False).eval()  # transformers' order
    hf_config = Mamba2Config(
        hidden_size=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM, state_size=HEAD_DIM, n_groups=n_groups,
        expand=1, conv_kernel=4, chunk_size=8, use_conv_bias=True, use_bias=False, layer_norm_epsilon=1e-5,
        num_hidden_layers=1,
    )
    hf = HFMamba2Mixer(hf_config, layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict())  # strict: the same names and shapes
    hidden = torch.randn(3, 21, HIDDEN)
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(ours(hidden)[0], hf(hidden), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            ours(hidden, attention_mask=mask)[0][mask.bool()], hf(hidden, attention_mask=mask)[mask.bool()],
            atol=1e-5, rtol=1e-4,
        )


# 2. the chunked path against the token-by-token reference


@pytest.mark.parametrize("length", [1, 8, 19], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("n_groups", [4, 2], ids=lambda g: f"groups{g}")
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
def test_chunked_forward_matches_reference_outputs_and_grads(length, n_groups, norm_before_gate):
    mixer = make_mixer(n_groups=n_groups, norm_before_gate=norm_before_gate)
    hidden = torch.randn(2, length, HIDDEN, dtype=torch.float64, requires_grad=True)
    out, _ = mixer(hidden)
    ref = reference_forward(mixer, hidden)
    torch.testing.assert_close(out, ref)
    tensors = [hidden, *mixer.parameters()]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    ref_grads = torch.autograd.grad(ref, tensors, grad_out)
    names = ["hidden"] + [name for name, _ in mixer.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}")


# 3. recurrent decoding


def _decode(mixer, hidden, state=None, mask=None):
    outs = []
    for t in range(hidden.shape[1]):
        step_mask = None if mask is None else mask[:, : mask.shape[1] - hidden.shape[1] + t + 1]
        out, state = mixer(hidden[:, t : t + 1], attention_mask=step_mask, state=state, use_cache=True)
        outs.append(out)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("prefill", [0, 1, 5, 16], ids=lambda p: f"prefill{p}")
def test_prefill_then_steps_equal_the_parallel_forward(prefill):
    mixer = make_mixer()
    hidden = torch.randn(2, 23, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        whole, whole_state = mixer(hidden, use_cache=True)
        state, pieces = None, []
        if prefill:
            out, state = mixer(hidden[:, :prefill], use_cache=True)
            pieces.append(out)
        out, state = _decode(mixer, hidden[:, prefill:], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(state[key], whole_state[key])


def test_prefill_in_pieces_equals_one_prefill_and_the_state_has_a_fixed_size():
    mixer = make_mixer()
    hidden = torch.randn(2, 40, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        whole, whole_state = mixer(hidden, use_cache=True)
        first, state = mixer(hidden[:, :11], use_cache=True)
        second, state = mixer(hidden[:, 11:], state=state, use_cache=True)
        _, short_state = mixer(hidden[:, :3], use_cache=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    assert {k: v.shape for k, v in short_state.items()} == {k: v.shape for k, v in whole_state.items()} == {
        "conv": (2, mixer.conv_dim, 3), "ssm": (2, HEADS, HEAD_DIM, HEAD_DIM)
    }


def test_left_padding_leaves_the_state_untouched():
    mixer = make_mixer()
    real = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    following = torch.randn(1, 4, HIDDEN, dtype=torch.float64)
    pad = 6
    garbage = 100 * torch.randn(1, pad, HIDDEN, dtype=torch.float64)
    padded = torch.cat([garbage, real], dim=1)
    mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 9 + 4)], dim=1).long()
    with torch.no_grad():
        alone, alone_state = mixer(real, use_cache=True)
        alone_next, _ = _decode(mixer, following, alone_state)
        out, state = mixer(padded, attention_mask=mask[:, : pad + 9], use_cache=True)
        out_next, _ = _decode(mixer, following, state, mask)
    torch.testing.assert_close(out[:, pad:], alone)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(state[key], alone_state[key])
    torch.testing.assert_close(out_next, alone_next)


# 4. inside the model


def test_hybrid_model_save_load_and_generate(tmp_path):
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 61, (2, 12))
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[1].mixer, Mamba2Mixer)
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    generated = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, 18)
    # greedy decoding with the cache agrees with re-running the whole sequence
    full = loaded(generated).logits
    assert torch.equal(full[:, 11:-1].argmax(-1), generated[:, 12:])


def test_loading_a_checkpoint_missing_some_mixer_tensors_keeps_the_loaded_ones(tmp_path):
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mixer.D"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    # the mixer's init ran for the missing D and left the loaded A_log, dt_bias and conv alone
    mixer, saved = loaded.model.layers[1].mixer, model.model.layers[1].mixer
    assert torch.equal(mixer.D, torch.ones(HEADS))
    for name in ("A_log", "dt_bias", "conv1d.weight", "norm.weight"):
        assert torch.equal(mixer.get_parameter(name), saved.get_parameter(name)), name


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config(layer_mixers=["mamba2", "mamba2"])).eval()
    short, long = torch.randint(3, 61, (1, 5)), torch.randint(3, 61, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate((short, long)):
        alone = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(together[row, -5:], alone[0, -5:])


# 5. options


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(num_heads=3), "num_heads"),
        (dict(n_groups=3), "n_groups"),
        (dict(head_dim=0), "head_dim"),
        (dict(state_size=-2), "state_size"),
        (dict(conv_kernel=2.5), "conv_kernel"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(use_conv_bias="yes"), "use_conv_bias"),
        (dict(time_step_min=0.0), "time_step_min"),
        (dict(time_step_min=0.5), "time_step_min"),
        (dict(time_step_floor=-1e-4), "time_step_floor"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(norm_before_gate=1), "norm_before_gate"),
        (dict(expand=2), "unknown option"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_options_raise_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(options)


def test_defaults_follow_the_attention_shape_and_init_is_mamba2s():
    torch.manual_seed(0)
    mixer = xatl.XatlForCausalLM(tiny_config()).model.layers[1].mixer
    assert (mixer.num_heads, mixer.head_dim, mixer.state_size, mixer.n_groups) == (HEADS, HEAD_DIM, HEAD_DIM, HEADS)
    A = mixer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(mixer.dt_bias)
    torch.testing.assert_close(dt.clamp(1e-3, 0.1), dt)
    assert torch.equal(mixer.D, torch.ones(HEADS)) and torch.equal(mixer.norm.weight, torch.ones(HIDDEN))
    assert mixer.norm.norm_before_gate  # see the module docstring
    # the conv gets PyTorch's default init (uniform within 1/sqrt(width)) over the skeleton's normal(0.02)
    assert mixer.conv1d.weight.abs().max() <= 0.5 and mixer.conv1d.weight.std() > 0.2
    assert torch.equal(mixer.conv1d.bias, torch.zeros(mixer.conv_dim))


@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
def test_a_small_gate_keeps_the_output_small_only_with_the_norm_first(norm_before_gate):
    """Why the norm comes first (module docstring): shrinking the gate's rows of in_proj 20-fold
    shrinks the output with them; with the gate first, the norm divides that scale out (down to
    its epsilon, made negligible here)."""
    mixer = make_mixer(norm_before_gate=norm_before_gate, norm_eps=1e-12)
    hidden = torch.randn(2, 12, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(hidden)[0].pow(2).mean().sqrt()
        mixer.in_proj.weight[: mixer.inner_size] /= 20  # z, the gate
        shrunk = mixer(hidden)[0].pow(2).mean().sqrt()
    ratio = (shrunk / full).item()
    assert ratio < 0.2 if norm_before_gate else ratio > 0.8, ratio


# 6. transfer from attention


def _donor_attention(config, seed=1):
    torch.manual_seed(seed)
    attention = Attention(config, layer_idx=1)
    for p in attention.parameters():  # biases off zero, so that their handling shows
        torch.nn.init.normal_(p, std=0.2)
    return {name: t.detach() for name, t in attention.state_dict().items()}


def _apply(mixer, assignments):
    params = dict(mixer.named_parameters())
    with torch.no_grad():
        for a in assignments:
            params[a.param].copy_(a.value)
    return {a.param: a for a in assignments}


def test_w_o_is_copied_bit_identical():
    config = tiny_config(attention_out_bias=True)
    mixer = Mamba2Mixer(config, layer_idx=1)
    attention = _donor_attention(config)
    assigned = _apply(mixer, mixer.init_from_attention(attention, config, include_qkv=False))
    assert set(assigned) == {"out_proj.weight", "out_proj.bias"}
    assert all(a.kind == "copied" for a in assigned.values())
    assert torch.equal(mixer.out_proj.weight, attention["o_proj.weight"])
    assert torch.equal(mixer.out_proj.bias, attention["o_proj.bias"])


def test_with_qkv_the_mixer_scores_like_the_donor_attention():
    config = tiny_config(attention_bias=True)  # Qwen2-style q/k/v biases: dropped, and the note says so
    mixer = Mamba2Mixer(config, layer_idx=1).eval()
    attention = _donor_attention(config)
    before = mixer.in_proj.weight.detach().clone()
    assigned = _apply(mixer, mixer.init_from_attention(attention, config, include_qkv=True))
    assert assigned["in_proj.weight"].kind == "initialised"
    assert "q_proj.bias, k_proj.bias, v_proj.bias dropped" in assigned["in_proj.weight"].note
    inner = HEADS * HEAD_DIM
    z_rows, dt_rows = slice(0, inner), slice(-HEADS, None)
    assert torch.equal(mixer.in_proj.weight[z_rows], before[z_rows])
    assert torch.equal(mixer.in_proj.weight[dt_rows], before[dt_rows])

    hidden = torch.randn(1, 6, HIDDEN)
    with torch.no_grad():
        _, x, B, C, _, _ = mixer._ssm_inputs(hidden, None, None, False)

    def heads(weight, n):  # donor projection without bias, per head: (T, n, head_dim)
        return (hidden[0] @ weight.T).view(6, n, HEAD_DIM)

    q = heads(attention["q_proj.weight"], HEADS)
    k = heads(attention["k_proj.weight"], KV_HEADS).repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = heads(attention["v_proj.weight"], KV_HEADS).repeat_interleave(HEADS // KV_HEADS, dim=1)
    torch.testing.assert_close(x[0], F.silu(v))
    # the score of query position 5 on key position 2, head 3: C·B = silu(q)·silu(k)
    torch.testing.assert_close(C[0, 5, 3] @ B[0, 2, 3], F.silu(q[5, 3]) @ F.silu(k[2, 3]))
    torch.testing.assert_close(C[0], F.silu(q))
    torch.testing.assert_close(B[0], F.silu(k))


@pytest.mark.parametrize(
    "options,include_qkv,message",
    [
        (dict(head_dim=4), False, "num_heads \\* head_dim"),
        (dict(state_size=4), True, "state_size=4"),
        (dict(n_groups=2), True, "n_groups=2"),
    ],
    ids=["inner-size", "state-size", "groups"],
)
def test_transfer_refuses_shapes_that_do_not_map(options, include_qkv, message):
    config = tiny_config(options)
    mixer = Mamba2Mixer(config, layer_idx=1)
    with pytest.raises(ValueError, match=message):
        mixer.init_from_attention(_donor_attention(config), config, include_qkv=include_qkv)


# kernels (CUDA with mamba_ssm and causal-conv1d only)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available()
    or importlib.util.find_spec("mamba_ssm") is None
    or importlib.util.find_spec("causal_conv1d") is None,
    reason="needs CUDA, mamba_ssm and causal-conv1d",
)
def test_kernels_match_the_pytorch_path_outputs_and_grads():
    mixer = make_mixer(torch.float32, n_groups=2, chunk_size=64).cuda()
    hidden = torch.randn(2, 150, HIDDEN, device="cuda", requires_grad=True)
    results = []
    for use_kernels in (True, False):
        mixer.use_kernels = use_kernels
        out, state = mixer(hidden, use_cache=True)
        step, _ = mixer(hidden[:, :1], state=state, use_cache=True)
        grads = torch.autograd.grad(out.square().sum(), [hidden, *mixer.parameters()])
        results.append((out, state["ssm"], state["conv"], step, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
