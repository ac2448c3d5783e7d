import pytest
import torch

from xatl.ops.simple_gla import chunk_simple_gla, naive_simple_gla


def _inputs(batch, length, heads, key_dim, value_dim, dtype, decay_scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, key_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, length, heads, key_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, length, heads, value_dim, generator=gen, dtype=dtype)
    g = -torch.rand(batch, length, heads, generator=gen, dtype=dtype) * decay_scale
    s0 = torch.randn(batch, heads, key_dim, value_dim, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, g)], s0


@pytest.mark.parametrize(
    "length,chunk_size", [(1, 16), (16, 16), (77, 16), (130, 64)], ids=lambda x: str(x)
)
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "initial_state"])
def test_chunked_matches_reference_outputs_and_grads(length, chunk_size, with_state):
    (q, k, v, g), s0 = _inputs(2, length, 3, 8, 5, torch.float64)
    s0 = s0 if with_state else None
    o1, s1 = chunk_simple_gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk_size)
    o2, s2 = naive_simple_gla(q, k, v, g, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(s1, s2)
    weights = torch.randn_like(o1)
    loss1 = (o1 * weights).sum() + s1.square().sum()
    loss2 = (o2 * weights).sum() + s2.square().sum()
    for a, b in zip(torch.autograd.grad(loss1, [q, k, v, g]), torch.autograd.grad(loss2, [q, k, v, g])):
        torch.testing.assert_close(a, b)


def test_float32_strong_decay_stays_finite_and_close():
    (q, k, v, g), _ = _inputs(1, 256, 2, 16, 16, torch.float32, decay_scale=8.0)
    o1, _ = chunk_simple_gla(q, k, v, g)
    o2, _ = naive_simple_gla(q, k, v, g)
    assert torch.isfinite(o1).all()
    torch.testing.assert_close(o1, o2, atol=1e-4, rtol=1e-4)


def test_split_sequence_with_carried_state_equals_whole():
    (q, k, v, g), _ = _inputs(2, 100, 2, 4, 4, torch.float64)
    whole, _ = chunk_simple_gla(q, k, v, g, chunk_size=32)
    first, state = chunk_simple_gla(q[:, :37], k[:, :37], v[:, :37], g[:, :37], output_final_state=True)
    second, _ = chunk_simple_gla(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)


def test_strong_decays_keep_gradients_finite():
    (q, k, v, g), _ = _inputs(1, 128, 2, 8, 8, torch.float32, decay_scale=8.0)
    out, _ = chunk_simple_gla(q, k, v, g)
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, g])
    assert all(torch.isfinite(grad).all() for grad in grads)
