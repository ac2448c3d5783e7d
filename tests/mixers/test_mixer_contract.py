"""The contract every mixer keeps, one test for all of them (as flash-linear-attention's model tests
do): decoding token by token and prefilling in chunks equal the parallel forward; states carry the
batch on dim 0 and keep one size unless the mixer says they grow; and the state contract the engine
batches with (`pad_state`, `concat_states`, `select_state`) joins and splits rows exactly."""

import pytest
import torch

from xatl.config import XatlConfig
from xatl.mixer_options import MIXER_OPTIONS
from xatl.mixers import MIXERS, get_mixer_class

BATCH, LENGTH = 2, 11


def make_mixer(name: str):
    config = XatlConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, layer_mixers=[name])
    torch.manual_seed(0)
    return get_mixer_class(name)(config, layer_idx=0).double().eval(), config


def run(mixer, hidden, start, state):
    """The mixer over `hidden` (B, T, hidden) at positions start.., continuing from `state`."""
    positions = torch.arange(start, start + hidden.shape[1])[None].expand(hidden.shape[0], -1)
    with torch.no_grad():
        return mixer(hidden, position_ids=positions, state=state, use_cache=True)


def test_every_mixer_has_its_options_and_no_option_table_lacks_a_mixer():
    assert list(MIXERS) == list(MIXER_OPTIONS)


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("chunks", [(11,), (4, 1, 1, 5), (1,) * 11, (3, 8)], ids=["whole", "mixed", "steps", "two"])
def test_steps_and_chunks_continue_the_parallel_forward(name, chunks):
    mixer, config = make_mixer(name)
    hidden = torch.randn(BATCH, LENGTH, config.hidden_size, dtype=torch.float64)
    whole, whole_state = run(mixer, hidden, 0, None)
    outs, state, start = [], None, 0
    for size in chunks:
        out, state = run(mixer, hidden[:, start : start + size], start, state)
        outs.append(out)
        start += size
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, atol=1e-9, rtol=1e-7)
    assert state.keys() == whole_state.keys()
    for key in state:
        torch.testing.assert_close(state[key].double(), whole_state[key].double(), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", MIXERS)
def test_states_put_the_batch_first_and_grow_only_when_the_mixer_says(name):
    mixer, config = make_mixer(name)
    hidden = torch.randn(BATCH, LENGTH, config.hidden_size, dtype=torch.float64)
    _, short = run(mixer, hidden[:, :3], 0, None)
    _, long = run(mixer, hidden, 0, None)
    for key in short:
        assert short[key].shape[0] == long[key].shape[0] == BATCH
        if mixer.state_grows:
            assert short[key].numel() * LENGTH == long[key].numel() * 3
        else:
            assert short[key].shape == long[key].shape


@pytest.mark.parametrize("name", MIXERS)
def test_rows_joined_by_the_state_contract_decode_as_they_would_alone(name):
    """Two sequences of different lengths joined into one batch (padded, concatenated), stepped
    together with the padding mask, then selected apart: each row's output and state are its own."""
    mixer, config = make_mixer(name)
    lengths = (7, 4)
    prompts = [torch.randn(1, n, config.hidden_size, dtype=torch.float64) for n in lengths]
    nexts = torch.randn(2, 1, config.hidden_size, dtype=torch.float64)
    states = [run(mixer, prompt, 0, None)[1] for prompt in prompts]
    alone = [run(mixer, nexts[i : i + 1], n, states[i]) for i, n in enumerate(lengths)]

    width = max(lengths)
    joined = mixer.concat_states([mixer.pad_state(s, width - n) for s, n in zip(states, lengths)])
    mask = torch.tensor([[0] * (width - n) + [1] * (n + 1) for n in lengths])  # (2, width + 1)
    positions = torch.tensor([[n] for n in lengths])
    with torch.no_grad():
        out, state = mixer(nexts, position_ids=positions, attention_mask=mask if mixer.state_grows else None,
                           state=joined, use_cache=True)
    for row, (alone_out, alone_state) in enumerate(alone):
        torch.testing.assert_close(out[row : row + 1], alone_out, atol=1e-9, rtol=1e-7)
        padding = width - lengths[row]
        kept = mixer.select_state(state, torch.tensor([row]), drop_columns=padding if mixer.state_grows else 0)
        for key in kept:
            torch.testing.assert_close(kept[key], alone_state[key], atol=1e-9, rtol=1e-7)
