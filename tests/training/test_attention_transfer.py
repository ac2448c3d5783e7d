"""Layer-wise attention transfer: each converted mixer learns the donor attention's output from the
donor's own input to that attention; nothing else moves; layers are independent problems."""

import json

import pytest
import torch
import torch.nn.functional as F
from training_fixtures import corpus_blocks, documents, parameters, tiny_model
from transformers import AutoModelForCausalLM

import xatl
from xatl.cli import main
from xatl.donors import Donor
from xatl.training.attention_transfer import (
    METRICS_FILE,
    AttentionTransferConfig,
    attention_transfer,
    evaluate_attention_transfer,
    trained_layers,
)
from xatl.training.checkpoint import latest_checkpoint

PLAN = ("attention",) * 3


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_model(PLAN, vocab_size=len(tokenizer), seed=1).eval()


def student(teacher, attention_layers=(1,), mixer="gla", seed=0):
    """The teacher converted as `xatl convert` would: its skeleton, `mixer` elsewhere, Q/K/V/O copied."""
    donor = Donor(teacher.config, dict(teacher.state_dict()), None, "llama", "tiny teacher")
    return xatl.convert(donor, mixer=mixer, attention_layers=list(attention_layers), transfer="xatl+qkv",
                        seed=seed).model


def run(teacher, text_tokenizer, config, model=None, **kwargs):
    model = model if model is not None else student(teacher)
    events = []
    result = attention_transfer(model, teacher, corpus_blocks(text_tokenizer), config, on_step=events.append,
                                **kwargs)
    return model, result, events


def layer_curves(events):
    return [e["layer_losses"] for e in events if e["event"] == "train"]


def test_the_error_is_measured_against_the_teachers_own_attention(teacher, tokenizer):
    """Recompute by hand: the teacher's hidden state entering layer i, its input norm, its attention."""
    model = student(teacher)
    ids = torch.stack(corpus_blocks(tokenizer)[:3])
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        expected = {}
        for i in (0, 2):
            x = teacher.model.layers[i].input_layernorm(hidden[i])
            target, _ = teacher.model.layers[i].mixer(x)
            output, _ = model.model.layers[i].mixer(x)
            expected[str(i)] = ((output - target).square().sum() / target.square().sum()).item()
    measured = evaluate_attention_transfer(model, teacher, list(ids), batch_size=3)
    assert measured == pytest.approx({**expected, "mean": (expected["0"] + expected["2"]) / 2}, rel=1e-5)


def test_each_layer_error_falls_and_nothing_but_the_converted_mixers_moves(teacher, tokenizer):
    model = student(teacher)
    before = parameters(model)
    valid = corpus_blocks(tokenizer, count=6, seed=5)
    start = evaluate_attention_transfer(model, teacher, valid)
    _, result, events = run(teacher, tokenizer, AttentionTransferConfig(max_steps=30, batch_size=4, lr=1e-2),
                            model=model, valid_blocks=valid)
    assert start["0"] > 0.3 and start["2"] > 0.3
    assert result.valid_loss < 0.5 * start["mean"]
    curves = layer_curves(events)
    assert set(curves[0]) == {"0", "2"}  # the converted layers; layer 1 kept attention
    for layer in ("0", "2"):
        assert curves[-1][layer] < 0.5 * curves[0][layer]
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all(n.startswith(("model.layers.0.mixer.", "model.layers.2.mixer.")) for n in moved)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the stage


def test_the_student_predicts_more_like_the_teacher_afterwards(teacher, tokenizer):
    model = student(teacher, attention_layers=())
    ids = torch.stack(corpus_blocks(tokenizer, count=6, seed=5)[:8])

    def kl():
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids).logits, -1)
            output = F.log_softmax(model(input_ids=ids).logits, -1)
        return F.kl_div(output, target, log_target=True, reduction="batchmean").item()

    start = kl()
    run(teacher, tokenizer, AttentionTransferConfig(max_steps=30, batch_size=4, lr=1e-2), model=model)
    assert kl() < 0.5 * start


def test_layers_train_independently(teacher, tokenizer):
    """Layer 0 trained alone ends where it ends when trained alongside layer 2."""
    config = dict(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=1)
    together, _, events = run(teacher, tokenizer, AttentionTransferConfig(**config))
    alone, _, alone_events = run(teacher, tokenizer, AttentionTransferConfig(**config, layers=[0]))
    assert [c["0"] for c in layer_curves(events)] == pytest.approx([c["0"] for c in layer_curves(alone_events)],
                                                                     rel=1e-6)
    pairs = zip(together.model.layers[0].mixer.named_parameters(), alone.model.layers[0].mixer.parameters())
    for (name, a), b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(alone.model.layers[2].parameters(),
                                                 student(teacher).model.layers[2].parameters()))


def test_events_and_metrics_jsonl_follow_the_loops_conventions(teacher, tokenizer, tmp_path):
    config = AttentionTransferConfig(max_tokens=200, batch_size=4, log_every=2, eval_every=2)
    _, result, events = run(teacher, tokenizer, config, valid_blocks=corpus_blocks(tokenizer, count=4, seed=5),
                            out_dir=tmp_path, tokenizer=tokenizer)
    # 4 blocks of 16 tokens per step: 200 tokens need 4 steps
    assert [(e["event"], e["step"]) for e in events] == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4),
                                                         ("done", 4)]
    train_event = events[0]
    assert {"step", "total_steps", "tokens", "loss", "layer_losses", "lr", "grad_norm",
            "tokens_per_second"} <= set(train_event)
    assert train_event["tokens"] == 128 and train_event["total_steps"] == 4
    assert train_event["loss"] == pytest.approx(sum(train_event["layer_losses"].values()) / 2)
    assert set(events[1]["valid_layer_losses"]) == {"0", "2"}
    assert result.valid_loss == events[3]["valid_loss"] and result.tokens == 256
    logged = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert logged == json.loads(json.dumps(events))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)  # the final model and tokenizer land in out_dir
    assert saved.config.layer_mixers == ["gla", "attention", "gla"] and (tmp_path / "tokenizer.json").is_file()


def test_resume_continues_exactly_like_an_uninterrupted_run(teacher, tokenizer, tmp_path):
    config = AttentionTransferConfig(max_steps=6, batch_size=4, lr=1e-2, warmup_steps=2, shuffle_buffer=7)
    whole, _, whole_events = run(teacher, tokenizer, config)
    steps, first_events = [], []

    def record(event):
        first_events.append(event)
        steps.extend([event["step"]] if event["event"] == "train" else [])

    model = student(teacher)
    stopped = attention_transfer(model, teacher, corpus_blocks(tokenizer), config, out_dir=tmp_path, on_step=record,
                                 should_stop=lambda: len(steps) >= 2)
    assert stopped.stopped and stopped.step == 2 and latest_checkpoint(tmp_path).name == "step-00000002"
    fresh = student(teacher, seed=123)  # its mixers come from the checkpoint
    second_events = []
    resumed = attention_transfer(fresh, teacher, corpus_blocks(tokenizer), config, out_dir=tmp_path, resume=True,
                                 on_step=second_events.append)
    assert resumed.step == 6 and not resumed.stopped
    assert layer_curves(first_events) + layer_curves(second_events) == layer_curves(whole_events)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), whole.parameters()))
    logged = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [e["step"] for e in logged if e["event"] == "train"] == list(range(1, 7))


def test_bf16_autocast_keeps_float32_weights(teacher, tokenizer):
    model, _, events = run(teacher, tokenizer, AttentionTransferConfig(max_steps=2, batch_size=2, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(list(c.values()))).all() for c in layer_curves(events))


@pytest.mark.parametrize("settings,message", [
    ({}, "exactly one budget"),
    ({"max_steps": 0}, "max_steps must be positive"),
    ({"max_steps": 1, "layers": []}, "non-empty list"),
    ({"max_steps": 1, "precision": "fp8"}, "precision must be one of"),
    ({"max_steps": 1, "grad_clip": 0}, "grad_clip must be positive"),
])
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        AttentionTransferConfig(**settings)
    with pytest.raises(ValueError, match="unknown attention-transfer option"):
        AttentionTransferConfig.from_dict({"max_steps": 1, "learning_rate": 1})


def test_what_cannot_be_transferred_is_refused(teacher, tokenizer):
    model = student(teacher)
    with pytest.raises(ValueError, match="layer 1 is not a converted layer of the model \\(converted: \\[0, 2\\]\\)"):
        trained_layers(model, teacher, [1])
    with pytest.raises(ValueError, match="no converted layer"):
        trained_layers(teacher, teacher)
    with pytest.raises(ValueError, match="does not match the model"):
        trained_layers(model, tiny_model(("attention",) * 2, vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="the teacher's layer 0 is 'gla', not attention"):
        trained_layers(model, student(teacher))
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        attention_transfer(model, teacher, corpus_blocks(tokenizer), AttentionTransferConfig(max_steps=1,
                                                                                             precision="fp16"))


def test_cli_writes_a_model_that_keeps_its_transfer_report(teacher, tokenizer, tmp_path, capsys):
    teacher.save_pretrained(tmp_path / "teacher")
    donor = Donor(teacher.config, dict(teacher.state_dict()), tokenizer, "llama", "tiny teacher")
    xatl.convert(donor, mixer="gla", transfer="xatl+qkv", out=tmp_path / "converted")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(40)))
    out = tmp_path / "transferred"
    code = main(["attention-transfer", str(tmp_path / "converted"), "--teacher", str(tmp_path / "teacher"),
                 "--data", str(corpus), "--block-size", "16", "--batch-size", "4", "--steps", "3",
                 "--valid-fraction", "0.2", "--lr", "5e-3", "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and set(summary["layer_losses"]) == {"0", "1", "2"} and summary["valid_loss"] > 0
    assert (out / "transfer_report.json").read_text() == (tmp_path / "converted" / "transfer_report.json").read_text()
    trained = AutoModelForCausalLM.from_pretrained(out)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert not torch.equal(trained.model.layers[0].mixer.g_proj.weight, converted.model.layers[0].mixer.g_proj.weight)
    assert torch.equal(trained.model.layers[0].mlp.up_proj.weight, converted.model.layers[0].mlp.up_proj.weight)
    assert main(["attention-transfer", str(tmp_path / "converted"), "--teacher", str(tmp_path / "teacher"),
                 "--data", str(corpus), "--steps", "1", "--layers", "7", "--out", str(out)]) == 2
