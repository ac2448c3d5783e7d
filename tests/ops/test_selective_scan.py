"""The selective scan: the parallel (chunked Blelloch) form against the token-by-token reference,
outputs and every gradient, and the pieces it is built from."""

import importlib.util

import pytest
import torch

from xatl.ops.selective_scan import (
    _reverse_scan_,
    _scan_,
    selective_scan,
    selective_scan_ref,
    selective_state_step,
)

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make_inputs(batch=2, channels=5, state_size=4, length=37, dtype=torch.float64, dt_scale=1.0, seed=0):
    """Inputs in mamba_ssm's layout, with step sizes and decays varied enough that the state both
    keeps and forgets within a few tokens."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length) * dt_scale,
        "A": -torch.rand(channels, state_size, generator=gen, dtype=dtype) * 3 - 0.1,
        "B": randn(batch, state_size, length),
        "C": randn(batch, state_size, length),
        "D": randn(channels),
        "z": randn(batch, channels, length),
        "delta_bias": randn(channels) * 0.5,
        "initial_state": randn(batch, channels, state_size),
    }


def run_both(inputs, chunk_size=None, **flags):
    fast = selective_scan(**inputs, **flags, output_final_state=True, chunk_size=chunk_size)
    slow = selective_scan_ref(**inputs, **flags, output_final_state=True)
    return fast, slow


@pytest.mark.parametrize("length,chunk_size", [(1, None), (2, None), (37, None), (37, 8), (64, 5), (100, 16)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize(
    "optional",
    [(), ("D", "z", "delta_bias"), ("initial_state",), ("D", "z", "delta_bias", "initial_state")],
    ids=["bare", "D-z-bias", "initial-state", "all"],
)
def test_parallel_matches_reference_outputs_and_grads(length, chunk_size, optional):
    inputs = make_inputs(length=length)
    inputs = {k: v.requires_grad_() for k, v in inputs.items() if k in optional or k in NAMES[:5]}
    (out, last), (ref_out, ref_last) = run_both(inputs, chunk_size, delta_softplus=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(last, ref_last)
    weights = torch.randn_like(out)
    tensors = list(inputs.values())
    grads = torch.autograd.grad((out * weights).sum() + last.square().sum(), tensors)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_last.square().sum(), tensors)
    for name, grad, ref_grad in zip(inputs, grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_without_softplus_delta_is_the_step_size():
    inputs = make_inputs(length=20)
    inputs["delta"] = inputs["delta"].abs()
    (out, last), (ref_out, ref_last) = run_both(inputs)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(last, ref_last)


def test_only_out_without_output_final_state():
    inputs = make_inputs(length=9)
    out, _ = selective_scan(**inputs, delta_softplus=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 9)
    torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True)[0])


def test_split_sequence_with_carried_state_equals_whole():
    inputs = make_inputs(length=50)
    inputs.pop("initial_state")
    whole, whole_last = selective_scan(**inputs, delta_softplus=True, output_final_state=True)
    sequence_args = ("u", "delta", "B", "C", "z")
    first = {k: v[..., :23] if k in sequence_args else v for k, v in inputs.items()}
    second = {k: v[..., 23:] if k in sequence_args else v for k, v in inputs.items()}
    out1, state = selective_scan(**first, delta_softplus=True, output_final_state=True)
    out2, last = selective_scan(**second, delta_softplus=True, initial_state=state, output_final_state=True)
    torch.testing.assert_close(torch.cat([out1, out2], -1), whole)
    torch.testing.assert_close(last, whole_last)


def test_decode_step_is_one_step_of_the_scan():
    inputs = make_inputs(length=1)
    out, last = selective_scan(**inputs, delta_softplus=True, output_final_state=True)
    step_out, step_state = selective_state_step(
        inputs["initial_state"], inputs["u"][..., 0], inputs["delta"][..., 0], inputs["A"],
        inputs["B"][..., 0], inputs["C"][..., 0], D=inputs["D"], z=inputs["z"][..., 0],
        dt_bias=inputs["delta_bias"], dt_softplus=True,
    )
    torch.testing.assert_close(step_out, out[..., 0])
    torch.testing.assert_close(step_state, last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    inputs = make_inputs(length=40)
    reference, ref_last = selective_scan_ref(**inputs, delta_softplus=True, output_final_state=True)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    out, last = selective_scan(**low, delta_softplus=True, output_final_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.double(), reference, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(last.double(), ref_last, atol=tolerance, rtol=tolerance)


def test_strong_decays_stay_finite_and_close_in_float32():
    """Step sizes up to ~30 and A down to -3: per-token decays down to e^-90, products of them far
    below float32's range. The decays are floored above the denormals; what that drops is far
    below float32's precision."""
    inputs = make_inputs(length=200, dt_scale=12.0, seed=1)
    reference, ref_last = selective_scan_ref(**inputs, delta_softplus=True, output_final_state=True)
    low = {k: v.float().requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan(**low, delta_softplus=True, output_final_state=True)
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last.double(), ref_last, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), list(low.values()))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("length", range(1, 18), ids=lambda n: f"T{n}")
def test_parallel_scans_match_the_recurrence_at_every_length(length):
    gen = torch.Generator().manual_seed(length)
    decay = torch.rand(3, length, 2, generator=gen, dtype=torch.float64)
    values = torch.randn(3, length, 2, generator=gen, dtype=torch.float64)
    forward, backward = values.clone(), values.clone()
    for t in range(1, length):
        forward[:, t] += decay[:, t] * forward[:, t - 1]
    for t in range(length - 2, -1, -1):
        backward[:, t] += decay[:, t] * backward[:, t + 1]
    decay_before = decay.clone()
    scanned, reverse_scanned = values.clone(), values.clone()
    _scan_(decay, scanned)
    _reverse_scan_(decay, reverse_scanned)
    torch.testing.assert_close(scanned, forward)
    torch.testing.assert_close(reverse_scanned, backward)
    assert torch.equal(decay, decay_before)  # the decays are read, never written


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None,
    reason="needs CUDA and mamba_ssm",
)
def test_matches_mamba_ssm_kernel_outputs_and_grads():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    inputs = make_inputs(batch=2, channels=64, state_size=16, length=300, dtype=torch.float32)
    inputs.pop("initial_state")  # the kernel starts from zeros
    inputs = {k: v.cuda().requires_grad_() for k, v in inputs.items()}
    results = []
    def kernel(**inputs):  # mamba_ssm's own keyword for the final state
        return selective_scan_fn(**inputs, return_last_state=True)

    def ours(**inputs):
        return selective_scan(**inputs, output_final_state=True)

    for scan in (kernel, ours):
        out, last = scan(**inputs, delta_softplus=True)
        grads = torch.autograd.grad(out.square().sum(), list(inputs.values()))
        results.append((out, last, *grads))
    for ours, kernel in zip(results[1], results[0]):
        torch.testing.assert_close(ours, kernel, atol=2e-3, rtol=2e-3)
