"""Weights in fp32, bf16 or int8: every mixer plan decodes through the engine at each precision,
bf16 and int8 logits stay close to fp32's, the linear mixers' recurrent state stays in float32 under
bf16 weights, and bad precisions are refused."""

import pytest
import torch
from serving_fixtures import plans, tiny_model

from xatl.serving import PRECISIONS, Engine, SamplingParams, apply_precision, weight_bytes

PLANS = plans()
GREEDY = dict(temperature=0.0, ignore_eos=True)
#: largest |logit - fp32 logit| allowed, as a fraction of the spread (max - min) of the fp32 logits
TOLERANCE = {"fp32": 0.0, "bf16": 0.03, "int8": 0.06}


def step_logits(engine: Engine, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits after the prompt's prefill and after each token fed through decode steps: (1 + n, V)."""
    batch = engine._batch
    logits, states = batch.prefill(torch.tensor([prompt_ids]))
    batch.add(states, len(prompt_ids))
    rows = [logits[0]]
    for token in continuation:
        rows.append(batch.step(torch.tensor([token]))[0])
    batch.keep([])
    return torch.stack(rows).float()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
def test_each_precision_decodes_every_plan_close_to_fp32(tokenizer, plan, precision):
    reference = Engine(tiny_model(PLANS[plan], len(tokenizer)), tokenizer, background=False, precision="fp32")
    engine = Engine(tiny_model(PLANS[plan], len(tokenizer)), tokenizer, background=False, precision=precision)
    assert engine.precision == precision
    prompt = tokenizer("Once upon a time")["input_ids"]

    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=6, **GREEDY)))
    tokens = [e.token_id for e in events]
    assert len(tokens) == 6 and all(0 <= t < len(tokenizer) for t in tokens)
    assert events[-1].finish_reason == "length"

    # the same tokens fed to both: the logits of every decode step, not just the argmax
    expected = step_logits(reference, prompt, tokens[:-1])
    got = step_logits(engine, prompt, tokens[:-1])
    spread = (expected.amax(-1) - expected.amin(-1))[:, None]
    assert torch.isfinite(got).all()
    assert ((got - expected).abs() / spread).max() <= TOLERANCE[precision]


@pytest.mark.parametrize("plan", [p for p in PLANS if p != "attention"])
def test_bf16_weights_keep_the_recurrent_state_in_float32(tokenizer, plan):
    engine = Engine(tiny_model(PLANS[plan], len(tokenizer)), tokenizer, background=False, precision="bf16")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    _, states = engine._batch.prefill(torch.tensor([tokenizer("Once upon")["input_ids"]]))
    for mixer, state in zip(engine.model.mixers, states):
        if mixer.state_grows:  # attention's cache: the keys and values, in the weights' dtype
            assert all(t.dtype == torch.bfloat16 for t in state.values())
            continue
        # every linear mixer has a recurrent sum in float32; a convolution window may be bf16
        dtypes = {name: t.dtype for name, t in state.items()}
        recurrent = {name: dtype for name, dtype in dtypes.items() if "conv" not in name}
        assert recurrent and set(recurrent.values()) == {torch.float32}, dtypes


def test_int8_stores_the_linear_weights_in_a_quarter_of_the_bytes(tokenizer):
    model = tiny_model(["gla", "attention", "gla"], len(tokenizer))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = sum(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    before = weight_bytes(model)
    # each linear weight: 1 byte an element instead of 4, and a float32 scale per row; the tied
    # embedding keeps its float32 bytes beside the LM head's int8 copy (untied in the config from then on)
    tied = model.config.tie_word_embeddings * model.config.vocab_size * model.config.hidden_size
    quantised = apply_precision(model, "int8")
    assert weight_bytes(quantised) == before - 3 * linear + 4 * rows + 4 * tied
    assert not any(type(m) is torch.nn.Linear for m in quantised.modules())


def test_bad_precisions_are_refused(tokenizer):
    model = tiny_model(["gla"], len(tokenizer))
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, int8"):
        Engine(model, tokenizer, precision="fp16")
    with pytest.raises(ValueError, match="not both"):
        Engine.from_pretrained("unused", precision="bf16", dtype=torch.float32)
    with pytest.raises(ValueError, match="CPU only"):
        apply_precision(tiny_model(["gla"], len(tokenizer)).to("meta"), "int8")


@pytest.mark.parametrize("in_features", [64, 100], ids=["kernel", "width-the-kernel-refuses"])
def test_int8_linear_equals_its_dequantised_reference(in_features):
    # the kernel takes widths that are multiples of 8 (others crash it): the rest run dequantised
    from xatl.quantization import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 48)
    layer = Int8Linear.from_linear(linear)
    reference = layer.dequantized()  # float32 weights = int8 weights x row scales
    assert (reference.weight - linear.weight).abs().max() <= layer.weight_scale.max() / 2 + 1e-7
    x = torch.randn(3, 5, in_features)
    if in_features % 8:
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    else:  # bfloat16 activations in, the product out in bfloat16 before the scales: ~3 significant digits
        torch.testing.assert_close(layer(x), reference(x), atol=2e-2, rtol=1e-2)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
