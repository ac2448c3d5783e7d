"""The decode step compiled at load on a thread of its own: which precisions compile by default,
requests served eagerly meanwhile, the same tokens once compiled, and an eager engine when compiling
fails."""

import collections
import sys

import pytest
import torch
from serving_fixtures import plans, tiny_model

from xatl.serving import Engine, SamplingParams
from xatl.serving.compiled import _has_cpp_compiler, compile_backend

PLANS = plans()
GREEDY = dict(temperature=0.0, ignore_eos=True)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def greedy_tokens(engine: Engine, prompt: list[int], count: int) -> list[int]:
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=count, **GREEDY)))
    assert events[-1].finish_reason == "length", events[-1]
    return [event.token_id for event in events]


def test_auto_compiles_where_it_paid_and_leaves_the_rest_eager():
    expected = "inductor" if _has_cpp_compiler() else None  # inductor's CPU code is C++
    assert compile_backend("auto", "bf16", CPU) == expected
    assert compile_backend("auto", "int8", CPU) == expected
    assert compile_backend("auto", "fp32", CPU) is None  # bound by reading its weights: no faster compiled
    assert compile_backend("auto", "fp32", CUDA) is None  # not measured on a GPU yet
    assert compile_backend("on", "fp32", CPU) == compile_backend(True, "bf16", CPU) == "inductor"
    assert compile_backend("on", "int8", CPU) == "inductor"
    assert compile_backend("off", "fp32", CPU) is compile_backend(False, "fp32", CPU) is None
    assert compile_backend("eager", "fp32", CPU) == "eager"
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        compile_backend(3, "fp32", CPU)


@pytest.mark.parametrize("plan", ["gla", "mamba2+attention"])
def test_requests_are_served_while_compiling_and_give_the_same_tokens_after(tokenizer, plan):
    # dynamo's "eager" backend runs the whole mechanism (thread, warm-up, swap) without a C++ build
    model = tiny_model(PLANS[plan], len(tokenizer))
    eager = Engine(model, tokenizer, background=False)
    switch_interval = sys.getswitchinterval()
    compiled = Engine(model, tokenizer, background=False, compile="eager")
    prompts = [tokenizer(text)["input_ids"] for text in ("Once upon a time", "Héllo wörld, ça va?")]

    during = greedy_tokens(compiled, prompts[0], 6)  # served at once, whatever the compiler's progress
    assert compiled.wait_until_compiled(timeout=300)
    assert sys.getswitchinterval() == switch_interval  # shortened while compiling only
    assert compiled.stats().decode_step == "compiled" and eager.stats().decode_step == "eager"
    assert during == greedy_tokens(eager, prompts[0], 6)
    for prompt in prompts:  # the compiled step, one row and then two rows of different lengths
        assert greedy_tokens(compiled, prompt, 8) == greedy_tokens(eager, prompt, 8)
    streams = [compiled.submit(p, SamplingParams(max_new_tokens=5, **GREEDY)) for p in prompts]
    together = [[event.token_id for event in stream] for stream in streams]
    assert together == [greedy_tokens(eager, p, 5) for p in prompts]


def test_every_model_of_a_process_decodes_with_its_compiled_step(tokenizer):
    # dynamo keeps the compiled variants of `decode_step` together for all models: past its limit a
    # model's steps fall back to eager without an error, so count the compiled graphs' own calls
    torch._dynamo.reset()  # no variants compiled by earlier tests, which a matching model would reuse
    calls = collections.Counter()

    def counting(graph, example_inputs):
        name = f"graph {len(calls)}"
        calls[name] = 0

        def run(*args):
            calls[name] += 1
            return graph.forward(*args)
        return run

    engines = [Engine(tiny_model(PLANS["gla"], len(tokenizer), seed=seed), tokenizer, background=False,
                      compile=counting) for seed in range(5)]
    prompts = [tokenizer(text)["input_ids"] for text in ("Once upon a time", "Héllo wörld, ça va?")]
    for engine in engines:
        assert engine.wait_until_compiled(timeout=300), engine._compiler.error
        before = sum(calls.values())
        streams = [engine.submit(p, SamplingParams(max_new_tokens=6, **GREEDY)) for p in prompts]
        assert all(len(list(stream)) == 6 for stream in streams)
        assert sum(calls.values()) - before >= 5  # the steps after the first token, all compiled


@pytest.mark.skipif(not _has_cpp_compiler(), reason="inductor needs a C++ compiler")
def test_two_models_of_one_shape_compiled_in_one_process_each_decode_with_their_own_weights(tokenizer):
    # inductor freezes float weights into the compiled code: a step compiled for one model and taken
    # for another of the same shape would decode with the first one's weights
    models = [tiny_model(PLANS["gla"], len(tokenizer), seed=seed) for seed in (0, 1)]
    compiled = [Engine(model, tokenizer, background=False, compile="on") for model in models]
    prompt = tokenizer("Once upon a time")["input_ids"]
    with torch.inference_mode():
        for model, engine in zip(models, compiled):
            assert engine.wait_until_compiled(timeout=900), engine._compiler.error
            eager = Engine(model, tokenizer, background=False)
            for batch in (engine._batch, eager._batch):
                _, states = batch.prefill(torch.tensor([prompt]))
                batch.add(states, len(prompt))
            tokens = torch.tensor([5])
            torch.testing.assert_close(engine._batch.step(tokens), eager._batch.step(tokens), atol=1e-4, rtol=1e-4)


def test_an_engine_whose_compilation_fails_stays_eager_and_serves(tokenizer, caplog):
    model = tiny_model(PLANS["gla"], len(tokenizer))
    engine = Engine(model, tokenizer, background=False, compile="no-such-backend")
    assert not engine.wait_until_compiled(timeout=300)
    assert engine.stats().decode_step == "failed"
    assert "compiling the decode step failed; decoding stays eager" in caplog.text
    prompt = tokenizer("Once upon a time")["input_ids"]
    assert greedy_tokens(engine, prompt, 5) == greedy_tokens(Engine(model, tokenizer, background=False), prompt, 5)


@pytest.mark.skipif(not _has_cpp_compiler(), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_default_inductor_step_equals_eager(tokenizer, precision):
    # the service's default path: inductor, C++ wrapper, frozen float weights or int8 weights as
    # inputs (about a minute each here)
    model = tiny_model(["gla", "attention"], len(tokenizer))
    eager = Engine(model, tokenizer, background=False, precision=precision)
    compiled = Engine(model, tokenizer, background=False, compile="on", precision=precision)
    assert compiled.wait_until_compiled(timeout=900), compiled._compiler.error
    prompts = [tokenizer(text)["input_ids"] for text in ("Once upon a time", "日本語のテキスト")]
    for prompt in prompts:
        assert greedy_tokens(compiled, prompt, 8) == greedy_tokens(eager, prompt, 8)
    with torch.inference_mode():  # the logits themselves, two rows of different lengths
        for engine in (eager, compiled):
            for prompt in prompts:
                _, states = engine._batch.prefill(torch.tensor([prompt]))
                engine._batch.add(states, len(prompt))
        tokens = torch.tensor([5, 9])
        torch.testing.assert_close(compiled._batch.step(tokens), eager._batch.step(tokens), atol=1e-4, rtol=1e-4)
