"""Mamba mixer: parity with transformers' MambaMixer (outputs and grads), recurrent decoding, left
padding, the model round trip, option checks, its init and the attention transfer."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

import xatl
from xatl.config import XatlConfig
from xatl.mixers.attention import Attention
from xatl.mixers.mamba import MambaMixer
from xatl.ops.causal_conv import causal_conv1d

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8


def tiny_config(mamba=None, **overrides) -> XatlConfig:
    settings = dict(
        vocab_size=61, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, bos_token_id=1, eos_token_id=2,
        layer_mixers=["mamba", "attention", "mamba"], mixer_options={"mamba": dict(mamba or {})},
    )
    return XatlConfig(**{**settings, **overrides})


def make_mixer(dtype=torch.float64, seed=0, **options) -> MambaMixer:
    """A mixer whose every parameter matters: D and the conv bias moved off their init, and step
    sizes large enough (about 0.3 to 1.3) that the state forgets within a few tokens."""
    torch.manual_seed(seed)
    mixer = MambaMixer(tiny_config(options), layer_idx=0).to(dtype)
    with torch.no_grad():
        mixer.D.normal_()
        mixer.conv1d.bias.normal_(0.0, 0.3)
        mixer.dt_proj.bias.uniform_(-1.0, 1.0)
    return mixer


# 1. parity with transformers


def test_matches_transformers_mamba_mixer_outputs_and_grads():
    ours = make_mixer(torch.float32)
    hf_config = MambaConfig(
        hidden_size=HIDDEN, state_size=16, expand=2, conv_kernel=4, time_step_rank=2,
        use_conv_bias=True, use_bias=False, num_hidden_layers=1,
    )
    hf = HFMambaMixer(hf_config, layer_idx=0)
    hf.load_state_dict(ours.state_dict())  # strict: the same names and shapes
    hidden = torch.randn(3, 21, HIDDEN, requires_grad=True)
    out, _ = ours(hidden)
    hf_out = hf(hidden)
    torch.testing.assert_close(out, hf_out, atol=1e-5, rtol=1e-4)
    grad_out = torch.randn_like(out)
    names = ["hidden"] + [name for name, _ in ours.named_parameters()]
    grads = torch.autograd.grad(out, [hidden, *ours.parameters()], grad_out)
    hf_grads = torch.autograd.grad(hf_out, [hidden, *hf.parameters()], grad_out)
    hf_names = ["hidden"] + [name for name, _ in hf.named_parameters()]
    hf_by_name = dict(zip(hf_names, hf_grads))
    for name, grad in zip(names, grads):
        torch.testing.assert_close(grad, hf_by_name[name], atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")

    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(
            ours(hidden, attention_mask=mask)[0][mask.bool()], hf(hidden, attention_mask=mask)[mask.bool()],
            atol=1e-5, rtol=1e-4,
        )


# 2. recurrent decoding


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
        _, short_state = mixer(hidden[:, :2], use_cache=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(state[key], whole_state[key])
    inner = 2 * HIDDEN
    assert {k: v.shape for k, v in short_state.items()} == {k: v.shape for k, v in whole_state.items()} == {
        "conv": (2, inner, 3), "ssm": (2, inner, 16)
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


def test_padded_steps_neither_write_nor_decay_the_ssm_state():
    mixer = make_mixer()
    hidden = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        _, state = mixer(hidden, use_cache=True)
        mask = torch.tensor([[1] * 7 + [0, 0, 0], [1] * 10])
        _, after = mixer(torch.randn(2, 3, HIDDEN, dtype=torch.float64), attention_mask=mask, state=state,
                         use_cache=True)
    assert torch.equal(after["ssm"][0], state["ssm"][0])
    assert not torch.equal(after["ssm"][1], state["ssm"][1])


# 3. inside the model


def test_hybrid_model_save_load_and_generate(tmp_path):
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config(eos_token_id=None)).eval()  # no early stop: all 6 tokens
    ids = torch.randint(3, 61, (2, 12))
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [type(layer.mixer).__name__ for layer in loaded.model.layers] == ["MambaMixer", "Attention", "MambaMixer"]
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    generated = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, 18)
    # greedy decoding with the cache agrees with re-running the whole sequence
    full = loaded(generated).logits
    assert torch.equal(full[:, 11:-1].argmax(-1), generated[:, 12:])


def test_loading_a_checkpoint_missing_some_mixer_tensors_keeps_the_loaded_ones(tmp_path):
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config())
    saved = model.model.layers[0].mixer
    with torch.no_grad():  # away from what the init would give again
        saved.A_log.add_(0.5)
        saved.D.mul_(3.0)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mixer.D"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).model.layers[0].mixer
    # the mixer's init ran for the missing D and left the loaded tensors alone
    assert torch.equal(loaded.D, torch.ones(2 * HIDDEN))
    for name in ("A_log", "dt_proj.weight", "dt_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight"):
        assert torch.equal(loaded.get_parameter(name), saved.get_parameter(name)), name


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    torch.manual_seed(0)
    model = xatl.XatlForCausalLM(tiny_config()).eval()
    short, long = torch.randint(3, 61, (1, 5)), torch.randint(3, 61, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate((short, long)):
        alone = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(together[row, -5:], alone[0, -5:])


# 4. options and init


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(expand=0), "expand"),
        (dict(expand=1.3), "expand"),
        (dict(state_size=0), "state_size"),
        (dict(time_step_rank=2.0), "time_step_rank"),
        (dict(conv_kernel=True), "conv_kernel"),
        (dict(use_conv_bias="yes"), "use_conv_bias"),
        (dict(use_bias=1), "use_bias"),
        (dict(time_step_min=0.0), "time_step_min"),
        (dict(time_step_min=0.5), "time_step_min"),
        (dict(time_step_floor=-1e-4), "time_step_floor"),
        (dict(time_step_scale=-1), "time_step_scale"),
        (dict(time_step_init_scheme="normal"), "time_step_init_scheme"),
        (dict(num_heads=4), "unknown option"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_options_raise_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(options)


def test_defaults_and_init_are_mambas():
    torch.manual_seed(0)
    config = tiny_config()
    assert config.mixer_options["mamba"] | {} == {
        "expand": 2, "state_size": 16, "time_step_rank": math.ceil(HIDDEN / 16), "conv_kernel": 4,
        "use_conv_bias": True, "use_bias": False, "time_step_min": 0.001, "time_step_max": 0.1,
        "time_step_floor": 1e-4, "time_step_scale": 1.0, "time_step_init_scheme": "random",
    }
    mixer = xatl.XatlForCausalLM(config).model.layers[0].mixer
    inner = 2 * HIDDEN
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None
    assert torch.equal(mixer.A_log, torch.arange(1, 17.0).log().expand(inner, -1))
    assert torch.equal(mixer.D, torch.ones(inner))
    dt = F.softplus(mixer.dt_proj.bias)
    torch.testing.assert_close(dt.clamp(1e-3, 0.1), dt)
    assert dt.max() / dt.min() > 10  # log-uniform over two decades
    bound = 2**-0.5  # time_step_rank ** -0.5
    assert mixer.dt_proj.weight.abs().max() <= bound and mixer.dt_proj.weight.std() > bound / 3
    # the conv gets PyTorch's default init (uniform within 1/sqrt(width)) over the skeleton's normal(0.02)
    assert mixer.conv1d.weight.abs().max() <= 0.5 and mixer.conv1d.weight.std() > 0.2
    assert torch.equal(mixer.conv1d.bias, torch.zeros(inner))


def test_expand_and_biases_shape_the_mixer():
    mixer = MambaMixer(tiny_config(dict(expand=1.5, use_bias=True, use_conv_bias=False, state_size=4)), 0)
    assert mixer.intermediate_size == 48
    assert mixer.in_proj.weight.shape == (96, HIDDEN) and mixer.in_proj.bias is not None
    assert mixer.x_proj.weight.shape == (2 + 2 * 4, 48) and mixer.conv1d.bias is None
    out, state = mixer(torch.randn(2, 5, HIDDEN), use_cache=True)
    assert out.shape == (2, 5, HIDDEN) and state["ssm"].shape == (2, 48, 4)


# 5. transfer from attention


def _donor_attention(config, seed=1):
    torch.manual_seed(seed)
    attention = Attention(config, layer_idx=1)
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return {name: t.detach() for name, t in attention.state_dict().items()}


def _apply(mixer, assignments):
    params = dict(mixer.named_parameters())
    with torch.no_grad():
        for a in assignments:
            params[a.param].copy_(a.value)
    return {a.param: a for a in assignments}


def test_w_o_is_copied_bit_identical_when_the_inner_size_is_the_attention_width():
    config = tiny_config(dict(expand=1, use_bias=True), attention_out_bias=True)
    mixer = MambaMixer(config, layer_idx=0)
    attention = _donor_attention(config)
    assigned = _apply(mixer, mixer.init_from_attention(attention, config, include_qkv=False))
    assert set(assigned) == {"out_proj.weight", "out_proj.bias"}
    assert all(a.kind == "copied" for a in assigned.values())
    assert torch.equal(mixer.out_proj.weight, attention["o_proj.weight"])
    assert torch.equal(mixer.out_proj.bias, attention["o_proj.bias"])


def test_a_w_o_bias_without_an_out_proj_bias_is_reported_dropped():
    config = tiny_config(attention_out_bias=True)  # use_bias stays false
    mixer = MambaMixer(config, layer_idx=0)
    assigned = _apply(mixer, mixer.init_from_attention(_donor_attention(config), config, include_qkv=False))
    assert set(assigned) == {"out_proj.weight"}
    assert "o_proj.bias dropped" in assigned["out_proj.weight"].note


@pytest.mark.parametrize("expand", [2, 1.5, 0.75], ids=lambda e: f"expand{e}")
def test_wider_or_narrower_inner_sizes_tile_w_o(expand):
    config = tiny_config(dict(expand=expand))
    mixer = MambaMixer(config, layer_idx=0)
    attention = _donor_attention(config)
    assigned = _apply(mixer, mixer.init_from_attention(attention, config, include_qkv=False))
    assert assigned["out_proj.weight"].kind == "initialised"
    # inner channels carrying attention channel j mod width: out_proj of them is W_O of the attention
    # output, for the channels the inner size reaches
    width = HEADS * HEAD_DIM
    reached = min(width, mixer.intermediate_size)
    attended = torch.randn(3, width)
    attended[:, reached:] = 0
    inner = attended[:, torch.arange(mixer.intermediate_size) % width]
    with torch.no_grad():
        torch.testing.assert_close(mixer.out_proj(inner), attended @ attention["o_proj.weight"].T)


def test_with_qkv_x_is_v_and_b_c_reproduce_the_donor_scores():
    """With V invertible (no grouped-query heads) and state_size >= hidden_size, B and C composed
    with the x rows give back the donor's scores summed over heads exactly; the pass-through conv
    makes x_t = silu(V h_t)."""
    config = tiny_config(dict(state_size=HIDDEN), num_key_value_heads=HEADS)
    mixer = MambaMixer(config, layer_idx=0)
    attention = _donor_attention(config)
    z_before = mixer.in_proj.weight[2 * HIDDEN :].detach().clone()
    dt_before = mixer.x_proj.weight[:2].detach().clone()
    assigned = _apply(mixer, mixer.init_from_attention(attention, config, include_qkv=True))
    assert {a.kind for a in assigned.values()} == {"initialised"}
    assert assigned["conv1d.weight"].sources == [] and assigned["conv1d.bias"].sources == []
    assert torch.equal(mixer.in_proj.weight[2 * HIDDEN :], z_before)  # z keeps its init
    assert torch.equal(mixer.x_proj.weight[:2], dt_before)  # dt rows keep their init

    value = mixer.in_proj.weight[: 2 * HIDDEN].double()
    assert torch.equal(value, torch.cat([attention["v_proj.weight"]] * 2).double())
    key_map = mixer.x_proj.weight[2 : 2 + HIDDEN].double() @ value  # B_t = key_map h_t
    query_map = mixer.x_proj.weight[2 + HIDDEN :].double() @ value  # C_t = query_map h_t
    q = attention["q_proj.weight"].double().view(HEADS, HEAD_DIM, HIDDEN)
    k = attention["k_proj.weight"].double().view(HEADS, HEAD_DIM, HIDDEN)
    scores = torch.einsum("hdi,hdj->ij", q, k) / math.sqrt(HEAD_DIM)
    torch.testing.assert_close(query_map.T @ key_map, scores, atol=1e-5, rtol=1e-5)

    hidden = torch.randn(1, 6, HIDDEN)
    with torch.no_grad():
        x, _ = mixer.in_proj(hidden).chunk(2, dim=-1)
        convolved, _ = causal_conv1d(x, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, activation="silu")
    torch.testing.assert_close(convolved, F.silu(hidden @ value.float().T))


def test_with_qkv_and_fewer_states_the_scores_are_their_best_low_rank_approximation():
    config = tiny_config(dict(state_size=4), num_key_value_heads=HEADS)
    mixer = MambaMixer(config, layer_idx=0)
    attention = _donor_attention(config)
    _apply(mixer, mixer.init_from_attention(attention, config, include_qkv=True))
    value = mixer.in_proj.weight[: 2 * HIDDEN].double()
    key_map = mixer.x_proj.weight[2:6].double() @ value
    query_map = mixer.x_proj.weight[6:].double() @ value
    q = attention["q_proj.weight"].double().view(HEADS, HEAD_DIM, HIDDEN)
    k = attention["k_proj.weight"].double().view(HEADS, HEAD_DIM, HIDDEN)
    scores = torch.einsum("hdi,hdj->ij", q, k) / math.sqrt(HEAD_DIM)
    singular = torch.linalg.svdvals(scores)
    error = torch.linalg.matrix_norm(scores - query_map.T @ key_map)
    torch.testing.assert_close(error, singular[4:].square().sum().sqrt(), atol=1e-4, rtol=1e-4)


def test_with_qkv_and_grouped_query_heads_v_is_repeated_per_head():
    config = tiny_config()  # 4 heads reading 2 key/value heads
    mixer = MambaMixer(config, layer_idx=0)
    attention = _donor_attention(config)
    _apply(mixer, mixer.init_from_attention(attention, config, include_qkv=True))
    per_head = attention["v_proj.weight"].view(KV_HEADS, HEAD_DIM, HIDDEN).repeat_interleave(2, dim=0)
    assert torch.equal(mixer.in_proj.weight[: HEADS * HEAD_DIM], per_head.reshape(-1, HIDDEN))
    assert torch.equal(mixer.in_proj.weight[HEADS * HEAD_DIM : 2 * HIDDEN], per_head.reshape(-1, HIDDEN))
    assert torch.isfinite(mixer.x_proj.weight).all()


# kernels (CUDA with mamba_ssm and causal-conv1d only)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available()
    or importlib.util.find_spec("mamba_ssm") is None
    or importlib.util.find_spec("causal_conv1d") is None,
    reason="needs CUDA, mamba_ssm and causal-conv1d",
)
def test_kernels_match_the_pytorch_path_outputs_and_grads():
    mixer = make_mixer(torch.float32).cuda()
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
