import pytest
import torch

from xatl.ops.gla import SUB_CHUNK, chunk_gla, gla_step, naive_gla
from xatl.ops.simple_gla import chunk_simple_gla


def _inputs(batch, length, heads, key_dim, value_dim, dtype, decay_scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, key_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, length, heads, key_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, length, heads, value_dim, generator=gen, dtype=dtype)
    g = -torch.rand(batch, length, heads, key_dim, generator=gen, dtype=dtype) * decay_scale
    s0 = torch.randn(batch, heads, key_dim, value_dim, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, g, s0)]


@pytest.mark.parametrize(
    "length,chunk_size",
    [(1, 16), (16, 16), (77, 16), (30, 3), (45, 4), (100, 32), (130, 64)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "initial_state"])
def test_chunked_matches_reference_outputs_and_grads(length, chunk_size, with_state):
    q, k, v, g, s0 = _inputs(2, length, 3, 8, 5, torch.float64)
    inputs = [q, k, v, g] + ([s0] if with_state else [])
    initial = s0 if with_state else None
    o1, s1 = chunk_gla(q, k, v, g, initial_state=initial, output_final_state=True, chunk_size=chunk_size)
    o2, s2 = naive_gla(q, k, v, g, initial_state=initial, output_final_state=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(s1, s2)
    weights = torch.randn_like(o1)
    loss1 = (o1 * weights).sum() + s1.square().sum()
    loss2 = (o2 * weights).sum() + s2.square().sum()
    for a, b in zip(torch.autograd.grad(loss1, inputs), torch.autograd.grad(loss2, inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_float32_strong_decay_stays_finite_and_close():
    # decays down to exp(-8) a step: cumulative log decays reach -500 inside a chunk
    q, k, v, g, _ = _inputs(1, 200, 2, 16, 16, torch.float32, decay_scale=8.0)
    o1, _ = chunk_gla(q, k, v, g, chunk_size=64)
    o2, _ = naive_gla(q, k, v, g)
    torch.testing.assert_close(o1, o2, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(o1.square().sum(), [q, k, v, g])
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_split_sequence_with_carried_state_equals_whole():
    q, k, v, g, _ = _inputs(2, 100, 2, 4, 4, torch.float64)
    whole, _ = chunk_gla(q, k, v, g, chunk_size=32)
    first, state = chunk_gla(q[:, :37], k[:, :37], v[:, :37], g[:, :37], output_final_state=True)
    second, _ = chunk_gla(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], initial_state=state, chunk_size=16)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)


def test_steps_continue_a_chunked_prefill():
    q, k, v, g, _ = _inputs(2, 40, 2, 4, 6, torch.float64)
    whole, _ = chunk_gla(q, k, v, g)
    _, state = chunk_gla(q[:, :33], k[:, :33], v[:, :33], g[:, :33], output_final_state=True)
    for t in range(33, 40):
        out, state = gla_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale=4**-0.5)
        torch.testing.assert_close(out, whole[:, t])


def test_a_decay_shared_by_every_key_dimension_is_simple_gla():
    q, k, v, g, s0 = _inputs(2, 70, 3, 8, 5, torch.float64)
    g_head = g[..., 0]  # (B, T, H)
    o1, s1 = chunk_gla(q, k, v, g_head[..., None].expand_as(g), initial_state=s0, output_final_state=True)
    o2, s2 = chunk_simple_gla(q, k, v, g_head, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(s1, s2)


def test_chunk_size_that_does_not_tile_into_sub_chunks_is_refused():
    q, k, v, g, _ = _inputs(1, 8, 1, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gla(q, k, v, g, chunk_size=SUB_CHUNK + 2)
