"""The decode batch: rows of different lengths join and leave between steps, and every row's
logits at every step equal the parallel forward of its own whole sequence, for every mixer plan."""

import pytest
import torch
from serving_fixtures import plans, tiny_model

from xatl.serving.batch import DecodeBatch

VOCAB = 64
PLANS = plans()


def parallel_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (T, V)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_rows_joining_and_leaving_match_the_parallel_forward(plan):
    model = tiny_model(plan, VOCAB)
    generator = torch.Generator().manual_seed(0)
    batch = DecodeBatch(model)
    # name: (step at which it joins, prompt length, steps it stays)
    schedule = {"a": (0, 5, 6), "b": (2, 11, 2), "c": (2, 3, 5), "d": (5, 8, 3)}
    sequences, produced, rows, steps_left = {}, {}, [], {}
    for step in range(8):
        for name, (join, length, stay) in schedule.items():
            if join == step:
                sequences[name] = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
                logits, states = batch.prefill(torch.tensor([sequences[name]]))
                produced[name] = [logits[0]]
                batch.add(states, length)
                rows.append(name)
                steps_left[name] = stay
        tokens = torch.randint(3, VOCAB, (len(rows),), generator=generator)
        logits = batch.step(tokens)
        for row, name in enumerate(rows):
            sequences[name].append(int(tokens[row]))
            produced[name].append(logits[row])
            steps_left[name] -= 1
        keep = [i for i, name in enumerate(rows) if steps_left[name] > 0]
        batch.keep(keep)
        rows = [rows[i] for i in keep]
        assert batch.size == len(rows)
    assert batch.size == 0 and batch.nbytes() == 0
    for name, (_, length, _) in schedule.items():
        # the logits after the prompt and after each fed token, as the parallel forward has them
        expected = parallel_logits(model, sequences[name])[length - 1:]
        torch.testing.assert_close(torch.stack(produced[name]), expected, atol=1e-5, rtol=1e-5, msg=name)


def test_attention_caches_drop_columns_no_remaining_row_uses():
    model = tiny_model(["attention"] * 2, VOCAB)
    batch = DecodeBatch(model)
    for length in (12, 4):
        _, states = batch.prefill(torch.randint(3, VOCAB, (1, length)))
        batch.add(states, length)
    assert batch.mask.shape == (2, 12) and batch.states[0]["key"].shape[2] == 12
    batch.keep([1])  # the long row leaves: the short one needs its own 4 columns only
    assert batch.mask.shape == (1, 4) and bool(batch.mask.all())
    assert batch.states[0]["key"].shape[:3] == (1, 2, 4)


LINEAR_PLANS = {name: plan for name, plan in PLANS.items() if name != "attention"}


@pytest.mark.parametrize("plan", LINEAR_PLANS.values(), ids=LINEAR_PLANS.keys())
def test_state_bytes_per_sequence_are_fixed_except_for_attention_layers(plan):
    model = tiny_model(plan, VOCAB)
    batch = DecodeBatch(model)
    sizes = {}
    for length in (4, 40):
        _, states = batch.prefill(torch.randint(3, VOCAB, (1, length)))
        sizes[length] = batch.sequence_state_bytes(states, length)
    fixed, per_token = sizes[4]
    assert sizes[40] == (fixed, per_token)
    assert fixed > 0
    attention_layers = plan.count("attention")
    config = model.config
    assert per_token == attention_layers * 2 * config.num_key_value_heads * config.head_dim * 4


def test_the_compiled_step_equals_the_eager_step_as_rows_join_and_leave():
    # dynamo's "eager" backend traces the step as inductor would, without a C++ build (minutes here)
    model = tiny_model(PLANS["gla"], VOCAB)
    eager, compiled = DecodeBatch(model), DecodeBatch(model)
    compiled.compile(backend="eager")
    generator = torch.Generator().manual_seed(0)
    for step, join in enumerate([7, 3, None, 5]):
        if join is not None:
            prompt = torch.randint(3, VOCAB, (1, join), generator=generator)
            for batch in (eager, compiled):
                _, states = batch.prefill(prompt)
                batch.add(states, join)
        if step == 2:
            for batch in (eager, compiled):
                batch.keep([1])
        tokens = torch.randint(3, VOCAB, (eager.size,), generator=generator)
        torch.testing.assert_close(compiled.step(tokens), eager.step(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("chunks", [(8, 8, 7), (1, 13, 9), (20, 3)], ids=["even", "one-token-first", "short-last"])
def test_a_prompt_prefilled_in_chunks_gives_the_logits_and_states_of_one_prefill(plan, chunks):
    model = tiny_model(plan, VOCAB)
    batch = DecodeBatch(model)
    prompt = torch.randint(3, VOCAB, (1, sum(chunks)), generator=torch.Generator().manual_seed(0))
    whole_logits, whole_states = batch.prefill(prompt)
    states, start = None, 0
    for size in chunks:
        logits, states = batch.prefill(prompt[:, start : start + size], states, start=start)
        start += size
    torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5)
    for layer, (state, whole) in enumerate(zip(states, whole_states)):
        assert state.keys() == whole.keys()
        for key in state:
            torch.testing.assert_close(state[key], whole[key], atol=1e-5, rtol=1e-5, msg=f"layer {layer} {key}")
