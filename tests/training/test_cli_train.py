import json

import pytest
import torch
from training_fixtures import documents, skeleton_names, tiny_model, write_model_dir
from transformers import AutoModelForCausalLM

from xatl.cli import main
from xatl.training import METRICS_FILE


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(80)))
    return path


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    model = tiny_model(("mamba2", "attention"), vocab_size=len(tokenizer))
    return write_model_dir(tmp_path / "converted", model, tokenizer, skeleton_names(model))


def common(corpus, out):
    return ["--data", str(corpus), "--block-size", "16", "--batch-size", "4", "--out", str(out), "--no-progress"]


def test_xatl_train_writes_a_model_that_loads_and_reports_json(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "trained"
    code = main(["train", str(model_dir), *common(corpus, out), "--tokens", "320", "--freeze", "steps:2",
                 "--valid-fraction", "0.2", "--lr", "5e-3", "--eval-every", "2", "--eval-batches", "2"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 5 and summary["tokens"] == 320 and summary["unfreeze_step"] == 2
    events = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4, 5]
    assert summary["valid_loss"] == events[-2]["valid_loss"]
    trained = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(trained.lm_head.weight, before.lm_head.weight)
    assert (out / "transfer_report.json").is_file() and (out / "tokenizer.json").is_file()


def test_xatl_train_distils_from_a_teacher_directory(model_dir, corpus, tmp_path, tokenizer, capsys):
    teacher_dir = tmp_path / "teacher"
    teacher = tiny_model(("attention", "attention"), vocab_size=len(tokenizer), seed=1)
    teacher.save_pretrained(teacher_dir)
    out = tmp_path / "distilled"
    code = main(["train", str(model_dir), *common(corpus, out), "--steps", "2", "--valid-fraction", "0",
                 "--teacher", str(teacher_dir), "--distill", "kl,hidden"])
    assert code == 0
    events = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert {"kl_loss", "hidden_loss"} <= set(events[0])


def test_xatl_train_resumes_from_its_latest_checkpoint(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(model_dir), *common(corpus, out), "--steps", "4", "--valid-fraction", "0"]
    assert main([*args, "--save-every", "2"]) == 0
    uninterrupted = [json.loads(line)["loss"] for line in (out / METRICS_FILE).read_text().splitlines()
                     if '"train"' in line]
    assert main([*args, "--resume"]) == 0  # from step 2 again: the same last two steps
    resumed = [json.loads(line)["loss"] for line in (out / METRICS_FILE).read_text().splitlines()
               if '"train"' in line]
    assert resumed == uninterrupted


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "2", "--distill", "kl"], "--distill kl needs --teacher"),
        (["--steps", "2", "--freeze", "sometimes"], "unknown freeze schedule"),
        (["--steps", "2", "--data", "missing.txt"], "does not exist"),
        (["--steps", "2", "--valid-fraction", "0.001"], "the validation split is empty"),
        (["--steps", "2", "--resume"], "no checkpoint to resume from"),
    ],
)
def test_mistakes_are_one_line_errors(model_dir, corpus, tmp_path, capsys, extra, message):
    code = main(["train", str(model_dir), *common(corpus, tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_freezing_needs_the_transfer_report(corpus, tmp_path, tokenizer, capsys):
    bare = tmp_path / "bare"
    tiny_model(vocab_size=len(tokenizer)).save_pretrained(bare)
    tokenizer.save_pretrained(bare)
    code = main(["train", str(bare), *common(corpus, tmp_path / "out"), "--steps", "1", "--freeze", "lit"])
    assert code == 2 and "transfer_report.json" in capsys.readouterr().err


@pytest.mark.parametrize("text,count", [("320", 320), ("3M", 3_000_000), ("2e4", 20_000), ("1.5k", 1500)])
def test_token_counts_read_like_people_write_them(text, count):
    from xatl.cli.train import _count

    assert _count(text) == count
