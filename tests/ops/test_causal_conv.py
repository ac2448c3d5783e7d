import pytest
import torch

from xatl.ops.causal_conv import causal_conv1d, causal_conv1d_step, naive_causal_conv1d


def _inputs(batch, length, channels, width, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen, dtype=dtype)
    weight = torch.randn(channels, width, generator=gen, dtype=dtype)
    bias = torch.randn(channels, generator=gen, dtype=dtype)
    state = torch.randn(batch, channels, width - 1, generator=gen, dtype=dtype)
    return x, weight, bias, state


@pytest.mark.parametrize("length,width", [(1, 4), (3, 4), (17, 4), (9, 2), (6, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("activation", [None, "silu"], ids=["linear", "silu"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "initial_state"])
def test_matches_reference_outputs_and_grads(length, width, activation, with_state):
    x, weight, bias, state = _inputs(2, length, 5, width)
    state = state if with_state else None
    tensors = [t.requires_grad_() for t in (x, weight, bias) + ((state,) if with_state else ())]
    out, _ = causal_conv1d(x, weight, bias, activation=activation, initial_state=state)
    ref = naive_causal_conv1d(x, weight, bias, activation=activation, initial_state=state)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, tensors, grad_out), torch.autograd.grad(ref, tensors, grad_out)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("split", [1, 2, 5, 11])
def test_split_with_carried_state_equals_whole(split):
    x, weight, bias, _ = _inputs(2, 12, 6, 4)
    whole, whole_state = causal_conv1d(x, weight, bias, activation="silu", output_final_state=True)
    first, state = causal_conv1d(x[:, :split], weight, bias, activation="silu", output_final_state=True)
    second, last_state = causal_conv1d(
        x[:, split:], weight, bias, activation="silu", initial_state=state, output_final_state=True
    )
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(last_state, whole_state)
    # the state is the last W - 1 inputs
    torch.testing.assert_close(whole_state, x[:, -3:].transpose(1, 2))


def test_short_sequence_state_is_zero_padded():
    x, weight, bias, _ = _inputs(1, 2, 3, 4)
    _, state = causal_conv1d(x, weight, bias, output_final_state=True)
    assert torch.equal(state[..., 0], torch.zeros(1, 3, dtype=x.dtype))
    torch.testing.assert_close(state[..., 1:], x.transpose(1, 2))


def test_steps_equal_the_parallel_form_and_leave_the_given_state_alone():
    x, weight, bias, initial = _inputs(2, 7, 4, 4)
    whole, whole_state = causal_conv1d(
        x, weight, bias, activation="silu", initial_state=initial, output_final_state=True
    )
    state, outs = initial, []
    for t in range(x.shape[1]):
        out, state = causal_conv1d_step(x[:, t], state, weight, bias, activation="silu")
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, dim=1), whole)
    torch.testing.assert_close(state, whole_state)
    assert torch.equal(initial, _inputs(2, 7, 4, 4)[3])


def test_half_precision_inputs_with_float32_weights_run_in_the_inputs_dtype():
    x, weight, bias, state = _inputs(2, 5, 3, 4, dtype=torch.float32)
    out, final = causal_conv1d(x.bfloat16(), weight, bias, initial_state=state, output_final_state=True)
    step, _ = causal_conv1d_step(x[:, 0].bfloat16(), state, weight, bias)
    assert out.dtype == final.dtype == step.dtype == torch.bfloat16
    ref = naive_causal_conv1d(x, weight, bias, initial_state=state)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.02)
    torch.testing.assert_close(step.float(), ref[:, 0], atol=0.1, rtol=0.02)


def test_unknown_activation_is_refused():
    x, weight, bias, _ = _inputs(1, 3, 2, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, activation="gelu")
