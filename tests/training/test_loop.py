import json

import pytest
import torch
from training_fixtures import corpus_blocks, parameters, skeleton_names, tiny_model
from transformers import AutoModelForCausalLM

from xatl.training import METRICS_FILE, TrainConfig, train
from xatl.training.checkpoint import latest_checkpoint, list_checkpoints


def run(tokenizer, config, *, seed=0, plan=("mamba2", "attention"), **kwargs):
    """Train a fresh tiny model; return it, the result and the events it reported."""
    model = tiny_model(plan, vocab_size=len(tokenizer), seed=seed)
    events = []
    result = train(model, corpus_blocks(tokenizer), config, on_step=events.append, **kwargs)
    return model, result, events


def losses(events):
    return [e["loss"] for e in events if e["event"] == "train"]


def test_loss_falls_and_a_seeded_run_repeats_exactly(tokenizer):
    config = TrainConfig(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=2)
    first, _, events = run(tokenizer, config)
    second, _, again = run(tokenizer, config)
    assert losses(events) == losses(again)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    curve = losses(events)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.5


def test_token_budget_sets_the_number_of_steps(tokenizer):
    # 4 blocks of 16 tokens per step: 200 tokens need ceil(200 / 64) = 4 steps
    _, result, events = run(tokenizer, TrainConfig(max_tokens=200, batch_size=4))
    assert result.total_steps == result.step == 4 and result.tokens == 256
    assert [e["tokens"] for e in events if e["event"] == "train"] == [64, 128, 192, 256]


def test_gradient_accumulation_equals_the_bigger_batch(tokenizer):
    one, _, _ = run(tokenizer, TrainConfig(max_steps=3, batch_size=8, lr=1e-2))
    accumulated, _, _ = run(tokenizer, TrainConfig(max_steps=3, batch_size=2, grad_accum=4, lr=1e-2))
    for (name, a), b in zip(one.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


EVERY_MIXER = ("mamba", "mamba2", "retention", "gla", "attention")


def test_bf16_autocast_trains_float32_weights(tokenizer):
    config = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, precision="bf16")
    model, result, events = run(tokenizer, config, plan=EVERY_MIXER)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses(events))))
    fp32, _, fp32_events = run(tokenizer, TrainConfig(max_steps=3, batch_size=2, lr=1e-2), plan=EVERY_MIXER)
    assert losses(events)[0] == pytest.approx(losses(fp32_events)[0], rel=0.02)  # same loss, rounded
    assert losses(events)[0] != losses(fp32_events)[0]  # ... but computed in bfloat16


def test_events_go_to_on_step_and_metrics_jsonl(tokenizer, tmp_path):
    valid = corpus_blocks(tokenizer, count=8, seed=5)
    config = TrainConfig(max_steps=4, batch_size=4, log_every=2, eval_every=2)
    _, result, events = run(tokenizer, config, valid_blocks=valid, out_dir=tmp_path)
    assert [(e["event"], e["step"]) for e in events] == [
        ("train", 2), ("eval", 2), ("train", 4), ("eval", 4), ("done", 4)
    ]
    logged = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert logged == json.loads(json.dumps(events))
    train_event = events[0]
    assert {"loss", "lm_loss", "lr", "grad_norm", "tokens_per_second", "total_steps", "frozen"} <= set(train_event)
    assert result.valid_loss == events[3]["valid_loss"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)  # the final model lands in out_dir
    assert saved.config.layer_mixers == ["mamba2", "attention"]


def test_resume_continues_exactly_like_an_uninterrupted_run(tokenizer, tmp_path):
    config = TrainConfig(max_steps=8, batch_size=4, lr=1e-2, warmup_steps=2, shuffle_buffer=7,
                         freeze="lit:window=2,threshold=0.5,patience=1", unfreeze_warmup_steps=2)
    transferred = set(skeleton_names(tiny_model(("mamba2", "attention"), vocab_size=len(tokenizer))))
    whole, whole_result, whole_events = run(tokenizer, config, transferred=transferred)
    assert 3 < whole_result.unfreeze_step < 8  # the resumed part crosses the unfreezing

    steps_seen = []

    def stop_after_three():
        return len(steps_seen) >= 3

    model = tiny_model(("mamba2", "attention"), vocab_size=len(tokenizer))
    first_events = []

    def record(event):
        first_events.append(event)
        if event["event"] == "train":
            steps_seen.append(event["step"])

    stopped = train(model, corpus_blocks(tokenizer), config, transferred=transferred, out_dir=tmp_path,
                    on_step=record, should_stop=stop_after_three)
    assert stopped.stopped and stopped.step == 3
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-00000003"
    saved = AutoModelForCausalLM.from_pretrained(checkpoint)  # a checkpoint is a loadable model
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), model.parameters()))

    fresh = tiny_model(("mamba2", "attention"), vocab_size=len(tokenizer), seed=123)  # weights come from disk
    second_events = []
    resumed = train(fresh, corpus_blocks(tokenizer), config, transferred=transferred, out_dir=tmp_path,
                    resume=True, on_step=second_events.append)
    assert resumed.step == 8 and resumed.unfreeze_step == whole_result.unfreeze_step
    assert losses(first_events) + losses(second_events) == losses(whole_events)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), whole.parameters()))
    logged = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [e["step"] for e in logged if e["event"] == "train"] == list(range(1, 9))  # reads as one run


def test_checkpoints_every_n_steps_keep_the_last_ones(tokenizer, tmp_path):
    run(tokenizer, TrainConfig(max_steps=5, batch_size=2, save_every=1, keep_checkpoints=2), out_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_should_stop_without_out_dir_returns_early(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    before = parameters(model)
    result = train(model, corpus_blocks(tokenizer), TrainConfig(max_steps=10, batch_size=2),
                   should_stop=lambda: True)
    assert result.stopped and result.step == 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "settings,message",
    [
        ({}, "exactly one budget"),
        ({"max_steps": 2, "max_tokens": 10}, "exactly one budget"),
        ({"max_steps": 0}, "max_steps must be positive"),
        ({"max_steps": 2, "precision": "fp8"}, "precision must be one of"),
        ({"max_steps": 2, "freeze": "later"}, "unknown freeze schedule"),
        ({"max_steps": 2, "distill": "attention"}, "distill: unknown kind"),
        ({"max_steps": 2, "kl_weight": 0}, "kl_weight"),
        ({"max_steps": 2, "warmup_steps": -1}, "warmup_steps must be >= 0"),
    ],
)
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_config_from_json_values():
    assert TrainConfig.from_dict({"max_steps": 3, "freeze": "steps:2"}).freeze == "steps:2"
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"max_steps": 1, "learning_rate": 1e-3})


def test_run_level_mistakes_are_refused(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    blocks = corpus_blocks(tokenizer)
    with pytest.raises(ValueError, match="needs a teacher"):
        train(model, blocks, TrainConfig(max_steps=1, distill="kl"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        train(model, blocks, TrainConfig(max_steps=1, precision="fp16"))
    with pytest.raises(ValueError, match="need out_dir"):
        train(model, blocks, TrainConfig(max_steps=1, save_every=1))


def test_a_run_that_fails_ends_with_a_failed_event_and_raises(tokenizer, tmp_path):
    model = tiny_model(("gla", "attention"), vocab_size=len(tokenizer))
    forward, calls = model.forward, []

    def breaks_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return forward(*args, **kwargs)

    model.forward = breaks_at_the_third_step
    events = []
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train(model, corpus_blocks(tokenizer), TrainConfig(max_steps=10, batch_size=4), out_dir=tmp_path,
              on_step=events.append)
    assert events[-1] == {"event": "failed", "step": 2,
                          "error": "RuntimeError: CUDA error: an illegal memory access (simulated)"}
    logged = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert logged[-1]["event"] == "failed"
    assert not (tmp_path / "model.safetensors").exists()  # no final model from a failed run
