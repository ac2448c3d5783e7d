"""The engine: greedy tokens equal transformers' `generate()`, batched results equal unbatched ones,
seeds reproduce, stop conditions end streams, a cancelled request frees its slot at the next step,
and an error reaches every stream it touches."""

import asyncio
import re
import time

import pytest
import torch
from serving_fixtures import plans, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import xatl
from xatl.serving import Engine, EngineStats, SamplingParams

PLANS = plans()
LINEAR_PLANS = {name: plan for name, plan in PLANS.items() if name != "attention"}
GREEDY = dict(temperature=0.0, ignore_eos=True)


def run(engine, prompt_ids, **params):
    events = list(engine.submit(prompt_ids, SamplingParams(**params)))
    return [e.token_id for e in events if e.token_id is not None], events


def prompts(tokenizer, count):
    texts = ["Once upon a time", "Héllo wörld", "日本語の", "Emoji: 🙂 and", "Lily was"]
    return [tokenizer(t)["input_ids"] for t in (texts * count)[:count]]


def test_greedy_equals_transformers_llama_generate(tokenizer):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )).eval()
    model = xatl.XatlForCausalLM(xatl.XatlConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    ))
    renamed = {re.sub(r"\.self_attn\.", ".mixer.", k): v for k, v in llama.state_dict().items()}
    model.load_state_dict(renamed, strict=True)
    engine = Engine(model, tokenizer, background=False)
    for prompt in prompts(tokenizer, 2):
        expected = llama.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        tokens, _ = run(engine, prompt, max_new_tokens=10, **GREEDY)
        assert tokens == expected


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_greedy_equals_the_models_own_generate(tokenizer, plan):
    model = tiny_model(plan, len(tokenizer))
    engine = Engine(model, tokenizer, background=False)
    prompt = prompts(tokenizer, 1)[0]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    tokens, events = run(engine, prompt, max_new_tokens=10, **GREEDY)
    assert tokens == expected
    assert events[-1].finish_reason == "length"
    # and the greedy tokens are the parallel forward's argmax over prompt + completion
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    assert logits.argmax(-1).tolist() == tokens


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_batched_equals_unbatched_with_requests_joining_mid_stream(tokenizer, plan):
    model = tiny_model(plan, len(tokenizer))
    requests = [(p, 3 + 2 * i) for i, p in enumerate(prompts(tokenizer, 4))]
    alone = [run(Engine(model, tokenizer, background=False), p, max_new_tokens=n, **GREEDY)[0]
             for p, n in requests]
    # two slots for four requests: two wait, then join as others finish
    engine = Engine(model, tokenizer, max_batch_size=2, background=False)
    streams = [engine.submit(p, SamplingParams(max_new_tokens=n, **GREEDY)) for p, n in requests]
    batched = [[e.token_id for e in stream] for stream in streams]
    assert batched == alone
    assert engine.stats() == EngineStats(running=0, waiting=0, state_bytes=0)


def test_text_and_figures_of_a_stream(tokenizer):
    model = tiny_model(PLANS["attention"], len(tokenizer))
    engine = Engine(model, tokenizer, background=False)
    prompt = prompts(tokenizer, 1)[0]
    tokens, events = run(engine, prompt, max_new_tokens=20, **GREEDY)
    assert "".join(e.text for e in events) == tokenizer.decode(tokens, skip_special_tokens=True)
    figures = events[-1].figures
    assert (figures.prompt_tokens, figures.completion_tokens) == (len(prompt), 20)
    assert 0 < figures.ttft_s <= figures.e2e_s and figures.tokens_per_s > 0
    config = model.config
    kv_bytes_per_token = 3 * 2 * config.num_key_value_heads * config.head_dim * 4
    assert figures.state_bytes == kv_bytes_per_token * (len(prompt) + 19)
    assert figures.peak_memory_bytes > 0


@pytest.mark.parametrize("plan", LINEAR_PLANS.values(), ids=LINEAR_PLANS.keys())
def test_state_bytes_do_not_grow_with_the_stream_without_attention(tokenizer, plan):
    model = tiny_model(plan, len(tokenizer))
    engine = Engine(model, tokenizer, background=False)
    short = run(engine, [1, 5], max_new_tokens=2, **GREEDY)[1][-1].figures.state_bytes
    long = run(engine, [1, *range(5, 45)], max_new_tokens=30, **GREEDY)[1][-1].figures.state_bytes
    growth = (40 + 29 - 2) * plan.count("attention") * 2 * 2 * 8 * 4  # tokens x layers x (k, v) x Hkv x hd x 4
    assert long - short == growth


def test_seeded_sampling_is_reproducible_in_any_batch(tokenizer):
    model = tiny_model(PLANS["attention"], len(tokenizer))
    prompt = prompts(tokenizer, 1)[0]
    sampled = dict(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.95, ignore_eos=True)
    first, _ = run(Engine(model, tokenizer, background=False), prompt, seed=3, **sampled)
    engine = Engine(model, tokenizer, background=False)
    others = [engine.submit(p, SamplingParams(seed=i, **sampled)) for i, p in enumerate(prompts(tokenizer, 3))]
    again = engine.submit(prompt, SamplingParams(seed=3, **sampled))
    for stream in others:
        list(stream)
    assert [e.token_id for e in again] == first
    different, _ = run(Engine(model, tokenizer, background=False), prompt, seed=4, **sampled)
    assert different != first


def test_a_stop_sequence_ends_the_text_before_it(tokenizer):
    model = tiny_model(PLANS["attention"], len(tokenizer))
    engine = Engine(model, tokenizer, background=False)
    prompt = prompts(tokenizer, 1)[0]
    _, events = run(engine, prompt, max_new_tokens=30, **GREEDY)
    full = "".join(e.text for e in events)
    stop = full[10:13]
    _, events = run(engine, prompt, max_new_tokens=30, stop=[stop, "never-there"], **GREEDY)
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"


def test_the_end_of_sequence_token_ends_the_stream(tokenizer):
    model = tiny_model(PLANS["attention"], len(tokenizer))
    prompt = prompts(tokenizer, 1)[0]
    tokens, _ = run(Engine(model, tokenizer, background=False), prompt, max_new_tokens=12, **GREEDY)
    model.config.eos_token_id = tokens[5]  # the sixth token is now the end of the sequence
    engine = Engine(model, tokenizer, background=False)
    stopped, events = run(engine, prompt, max_new_tokens=12, temperature=0.0)
    assert stopped == tokens[: tokens.index(tokens[5]) + 1]
    assert events[-1].finish_reason == "stop"
    assert events[-1].figures.completion_tokens == len(stopped)


def test_cancelling_frees_the_slot_at_the_next_step(tokenizer):
    model = tiny_model(PLANS["attention"], len(tokenizer))
    engine = Engine(model, tokenizer, max_batch_size=1)  # its own thread
    try:
        stream = engine.submit([1, 5, 6], SamplingParams(max_new_tokens=100_000, **GREEDY))
        events = iter(stream)
        for _ in range(3):
            next(events)
        assert engine.stats().running == 1
        stream.cancel()
        rest = list(events)
        assert rest[-1].finish_reason == "cancelled"
        assert rest[-1].figures.completion_tokens < 1000
        # the only slot is free again: another request runs to its end
        tokens, _ = run(engine, [1, 7], max_new_tokens=3, **GREEDY)
        assert len(tokens) == 3
        deadline = time.monotonic() + 5
        while engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine updates its batch just after sending the last event
        assert engine.stats().running == 0
    finally:
        engine.close()


def test_async_streams_read_from_an_event_loop(tokenizer):
    model = tiny_model(PLANS["attention"], len(tokenizer))
    engine = Engine(model, tokenizer)
    expected, _ = run(Engine(model, tokenizer, background=False), [1, 9, 10], max_new_tokens=6, **GREEDY)

    async def main():
        streams = [engine.submit_async([1, 9, 10], SamplingParams(max_new_tokens=6, **GREEDY)) for _ in range(3)]
        return [[e.token_id async for e in s] for s in streams]

    try:
        assert asyncio.run(main()) == [expected] * 3
    finally:
        engine.close()


def test_a_failing_step_ends_every_running_stream_with_an_error(tokenizer, monkeypatch):
    model = tiny_model(PLANS["attention"], len(tokenizer))
    engine = Engine(model, tokenizer, background=False)
    streams = [engine.submit(p, SamplingParams(max_new_tokens=50, **GREEDY)) for p in prompts(tokenizer, 2)]
    engine.step()
    engine.step()

    def broken_step(tokens):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine._batch, "step", broken_step)
    engine.step()
    for stream in streams:
        last = list(stream)[-1]
        assert last.finish_reason == "error" and "out of memory (simulated)" in last.error
    monkeypatch.undo()
    tokens, _ = run(engine, [1, 5], max_new_tokens=4, **GREEDY)  # the engine still serves
    assert len(tokens) == 4


def test_bad_prompts_are_refused_with_the_reason(tokenizer):
    model = tiny_model(PLANS["attention"], len(tokenizer), position_embedding_type="learned",
                       max_position_embeddings=32)
    engine = Engine(model, tokenizer, background=False)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, "):
        engine.submit([1, 10_000], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.submit([1] * 20, SamplingParams(max_new_tokens=13))
    tokens, _ = run(engine, [1] * 20, max_new_tokens=12, **GREEDY)  # exactly at the limit
    assert len(tokens) == 12


def test_from_pretrained_loads_a_saved_model_folder(tmp_path, tokenizer):
    model = tiny_model(PLANS["attention"], len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(tmp_path, background=False)
    expected, _ = run(Engine(model, tokenizer, background=False), [1, 5, 6], max_new_tokens=5, **GREEDY)
    assert run(engine, [1, 5, 6], max_new_tokens=5, **GREEDY)[0] == expected
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("plan", [PLANS["gla"], PLANS["mamba2+attention"]], ids=["gla", "mamba2+attention"])
def test_a_running_stream_gets_a_token_for_every_chunk_of_a_long_prompt(tokenizer, plan):
    """A long prompt is prefilled a chunk per iteration, between the decode steps of the streams
    already running: they wait one chunk per token, not the whole prompt; and the results are those
    of engines that prefill every prompt at once."""
    model = tiny_model(plan, len(tokenizer))
    short = [1, 5, 6]
    long = torch.randint(3, len(tokenizer), (40,), generator=torch.Generator().manual_seed(0)).tolist()
    one_shot = Engine(model, tokenizer, background=False, prefill_chunk=None)
    expected = [run(one_shot, prompt, max_new_tokens=n, **GREEDY)[0] for prompt, n in ((short, 12), (long, 3))]

    engine = Engine(model, tokenizer, background=False, prefill_chunk=8)
    running = engine.submit(short, SamplingParams(max_new_tokens=12, **GREEDY))
    engine.step()
    engine.step()  # the short stream runs
    submitted = time.perf_counter()
    waiting = engine.submit(long, SamplingParams(max_new_tokens=3, **GREEDY))
    long_events = list(waiting)  # drives the engine: five chunks of 8, then its tokens
    short_events = list(running)
    first_long = long_events[0].time
    # one token of the running stream for each of the four chunks before the last one
    assert sum(submitted < e.time < first_long for e in short_events) == 4
    assert [e.token_id for e in short_events] == expected[0]
    assert [e.token_id for e in long_events] == expected[1]
    assert engine.stats() == EngineStats(running=0, waiting=0, state_bytes=0)


def test_prefill_chunk_must_be_positive(tokenizer):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(tiny_model(PLANS["gla"], len(tokenizer)), tokenizer, prefill_chunk=0)
