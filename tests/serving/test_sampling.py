"""Greedy, temperature, top-k and top-p choices, each row with its own parameters and generator."""

import pytest
import torch

from xatl.serving.sampling import SamplingParams, sample_next_tokens


def draw(logits, params, n=300, seed=0):
    generators = [p.make_generator() for p in params]
    for i, g in enumerate(generators):
        g.manual_seed(seed + i)
    return torch.stack([sample_next_tokens(logits, params, generators) for _ in range(n)])  # (n, B)


def test_greedy_rows_take_the_argmax_while_other_rows_sample():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0)]
    tokens = draw(logits, params, n=50)
    assert (tokens[:, 0] == logits[0].argmax()).all()
    assert (tokens[:, 2] == logits[2].argmax()).all()
    assert tokens[:, 1].unique().numel() > 1


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, 2.7]])
    tokens = draw(logits, [SamplingParams(top_k=2)])
    assert set(tokens.flatten().tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    tokens = draw(probs.log(), [SamplingParams(top_p=0.7)])
    assert set(tokens.flatten().tolist()) == {0, 1}
    tokens = draw(probs.log(), [SamplingParams(top_p=0.85)])
    assert set(tokens.flatten().tolist()) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[1.0, 0.0]])
    cold = draw(logits, [SamplingParams(temperature=0.1)], n=400).float().mean()
    warm = draw(logits, [SamplingParams(temperature=1.0)], n=400).float().mean()
    hot = draw(logits, [SamplingParams(temperature=10.0)], n=400).float().mean()
    # share of the less likely token: ~0 when cold, 1/(1+e) ≈ 0.27 at 1, ~0.48 when hot
    assert cold < 0.01 and 0.2 < warm < 0.35 and hot > 0.4


def test_a_seed_makes_a_row_reproducible_whatever_shares_its_batch():
    logits = torch.randn(4, 64)
    alone = draw(logits[1:2], [SamplingParams(seed=7)], n=20, seed=7)[:, 0]
    params = [SamplingParams(), SamplingParams(seed=7), SamplingParams(temperature=0), SamplingParams(top_k=3)]
    generators = [p.make_generator() for p in params]
    batched = torch.stack([sample_next_tokens(logits, params, generators) for _ in range(20)])[:, 1]
    assert torch.equal(alone, batched)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_a_single_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="\n").stop == ("\n",)
