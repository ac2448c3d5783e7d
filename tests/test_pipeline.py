"""The job pipeline in the library: convert → train → evaluate → profile → publish, one call;
resumed after a stop from the last checkpoint; its model folder published whole."""

import json

import pytest
import torch
from job_fixtures import write_corpus, write_donor
from transformers import AutoModelForCausalLM

import xatl  # noqa: F401  (registers the model type)
from xatl.pipeline import (
    JOB_MARKER,
    AttentionTransferStage,
    ConvertStage,
    EvaluateStage,
    PipelineSpec,
    TrainStage,
    run_pipeline,
)
from xatl.training import TrainConfig
from xatl.training.attention_transfer import AttentionTransferConfig
from xatl.training.run import TrainingData


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
    return write_donor(tmp_path_factory.mktemp("donor"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.jsonl")


def spec_for(donor, corpus, *, steps=8, save_every=3, **overrides):
    return PipelineSpec(
        convert=ConvertStage(donor=str(donor), mixer="gla"),
        train=TrainStage(config=TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, save_every=save_every),
                         data=TrainingData([str(corpus)], valid_fraction=0.2, block_size=16)),
        evaluate=EvaluateStage(contexts=(8, 32), decode_tokens=4), name="tiny-gla", **overrides)


def test_a_conversion_job_ends_in_a_published_model_with_its_figures(tmp_path, donor, corpus):
    events = []
    result = run_pipeline(spec_for(donor, corpus), tmp_path / "work", publish_to=tmp_path / "models" / "tiny-gla",
                          job_id="job-1", on_event=events.append)
    assert not result.stopped and result.model_dir == str(tmp_path / "models" / "tiny-gla")
    stages = [(e["stage"], e["status"]) for e in events if e["event"] == "stage"]
    assert stages == [(s, status) for s in ("convert", "train", "evaluate", "profile", "publish")
                      for status in ("started", "done")]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, 9))

    # the figures: losses beside the donor's on the same text, decode profile beside the donor's
    assert result.train["steps"] == 8 and result.transfer["fraction_transferred"] > 0.5
    evaluation = result.evaluation
    assert evaluation["gap"] == pytest.approx(evaluation["valid_loss"] - evaluation["base_valid_loss"])
    model_rows, base_rows = result.profile["model"], result.profile["base"]
    assert [r["context"] for r in model_rows] == [8, 32]
    assert model_rows[0]["state_bytes"] == model_rows[1]["state_bytes"]  # constant memory
    assert base_rows[1]["state_bytes"] > base_rows[0]["state_bytes"]  # attention's cache grows

    # the published folder: loadable, with its card, curve, report and provenance
    folder = tmp_path / "models" / "tiny-gla"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "transfer_report.json", "metrics.jsonl",
                 "loss_curve.png", "README.md", JOB_MARKER):
        assert (folder / name).is_file(), name
    assert not (folder / "checkpoints").exists()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "- \"gla\"" in card and "base valid loss" in card
    assert json.loads((folder / JOB_MARKER).read_text())["job_id"] == "job-1"
    assert AutoModelForCausalLM.from_pretrained(folder).config.layer_mixers == ["gla", "gla"]
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-gla"]  # nothing left beside it


def test_a_stopped_job_resumes_from_its_last_checkpoint_and_skips_finished_stages(tmp_path, donor, corpus):
    spec = spec_for(donor, corpus, steps=8, save_every=3)
    first = []
    steps_seen = []

    def stop_after_four():
        return len(steps_seen) >= 4

    def record(event):
        first.append(event)
        if event["event"] == "train":
            steps_seen.append(event["step"])

    stopped = run_pipeline(spec, tmp_path / "work", publish_to=tmp_path / "models" / "m", job_id="job-2",
                           on_event=record, should_stop=stop_after_four)
    assert stopped.stopped and stopped.model_dir is None
    assert not (tmp_path / "models" / "m").exists()  # nothing published
    assert [e["step"] for e in first if e["event"] == "checkpoint"] == [3, 4]  # periodic, then at the stop

    second = []
    done = run_pipeline(spec, tmp_path / "work", publish_to=tmp_path / "models" / "m", job_id="job-2",
                        on_event=second.append)
    assert not done.stopped
    assert ("convert", "skipped") in [(e["stage"], e["status"]) for e in second if e["event"] == "stage"]
    resume = next(e for e in second if e["event"] == "resume")
    assert resume["step"] == 4
    assert [e["step"] for e in second if e["event"] == "train"] == [5, 6, 7, 8]  # never back past the checkpoint

    third = []
    again = run_pipeline(spec, tmp_path / "work", publish_to=tmp_path / "models" / "m", job_id="job-2",
                         on_event=third.append)
    assert {e["status"] for e in third if e["event"] == "stage"} == {"skipped"}
    assert again.model_dir == done.model_dir


def test_a_fine_tune_starts_from_a_model_folder(tmp_path, donor, corpus):
    converted = run_pipeline(PipelineSpec(convert=ConvertStage(donor=str(donor), mixer="retention")),
                             tmp_path / "convert", publish_to=tmp_path / "models" / "base")
    spec = PipelineSpec(base_model=converted.model_dir,
                        train=TrainStage(config=TrainConfig(max_steps=2, batch_size=4),
                                         data=TrainingData([str(corpus)], valid_fraction=0.2, block_size=16)),
                        evaluate=EvaluateStage(contexts=(8,), decode_tokens=3))
    result = run_pipeline(spec, tmp_path / "ft", publish_to=tmp_path / "models" / "ft")
    assert result.train["steps"] == 2 and "base_valid_loss" in result.evaluation
    assert "retention" in (tmp_path / "models" / "ft" / "config.json").read_text()


def test_a_pipeline_needs_exactly_one_starting_point(donor):
    with pytest.raises(ValueError, match="exactly one"):
        PipelineSpec()
    with pytest.raises(ValueError, match="exactly one"):
        PipelineSpec(convert=ConvertStage(donor=str(donor)), base_model="x")


def test_under_torchrun_one_process_converts_and_publishes_and_both_train(tmp_path, donor, corpus):
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(f"""
import json, torch
from xatl.pipeline import ConvertStage, EvaluateStage, PipelineSpec, TrainStage, run_pipeline
from xatl.training import TrainConfig
from xatl.training.run import TrainingData
torch.set_num_threads(1)
spec = PipelineSpec(convert=ConvertStage(donor={str(donor)!r}, mixer="retention"),
    train=TrainStage(config=TrainConfig(max_steps=3, batch_size=2, lr=1e-2),
                     data=TrainingData([{str(corpus)!r}], valid_fraction=0.2, block_size=16)),
    evaluate=EvaluateStage(contexts=(8,), decode_tokens=3))
events = []
result = run_pipeline(spec, {str(tmp_path / "work")!r}, publish_to={str(tmp_path / "models" / "ddp")!r},
                      on_event=events.append)
print(json.dumps({{"model_dir": result.model_dir, "stages": [e["stage"] for e in events if e["event"] == "stage"]}}))
""")
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(script)], capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    reports = [json.loads(line) for line in launched.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["model_dir"] is None for r in reports) == [False, True]  # rank 0 published, rank 1 did not
    rank0 = next(r for r in reports if r["model_dir"])
    assert rank0["stages"].count("convert") == 2 and "publish" in rank0["stages"]
    assert (tmp_path / "models" / "ddp" / "config.json").is_file()
    rank1 = next(r for r in reports if r["model_dir"] is None)
    assert rank1["stages"] == []  # only rank 0 reports


def two_stage_spec(donor, corpus, *, at_steps=6, steps=4):
    spec = spec_for(donor, corpus, steps=steps, save_every=2)
    spec.attention_transfer = AttentionTransferStage(
        config=AttentionTransferConfig(max_steps=at_steps, batch_size=4, lr=1e-2, save_every=2))
    return spec


def test_attention_transfer_runs_before_training_and_the_model_trains_on_from_it(tmp_path, donor, corpus):
    events = []
    result = run_pipeline(two_stage_spec(donor, corpus), tmp_path / "work", publish_to=tmp_path / "models" / "m",
                          job_id="job-at", on_event=events.append)
    assert not result.stopped
    started = [e["stage"] for e in events if e["event"] == "stage" and e["status"] == "started"]
    assert started == ["convert", "attention_transfer", "train", "evaluate", "profile", "publish"]
    steps = [(e["stage"], e["step"]) for e in events if e["event"] == "train"]
    assert steps == [("attention_transfer", s) for s in range(1, 7)] + [("train", s) for s in range(1, 5)]
    at_events = [e for e in events if e["event"] == "train" and e["stage"] == "attention_transfer"]
    assert all(set(e["layer_losses"]) == {"0", "1"} for e in at_events)  # a loss per converted layer
    assert [(e["stage"], e["step"]) for e in events if e["event"] == "checkpoint"] == [
        ("attention_transfer", 2), ("attention_transfer", 4), ("train", 2)]
    assert result.attention_transfer["steps"] == 6 and set(result.attention_transfer["layer_losses"]) == {"0", "1"}
    assert result.train["steps"] == 4

    # attention transfer moved the mixers alone; training started from its model, not the conversion's
    from safetensors.torch import load_file

    converted = load_file(tmp_path / "work" / "converted" / "model.safetensors")
    transferred = load_file(tmp_path / "work" / "attention_transfer" / "model.safetensors")
    changed = {n for n in converted if not torch.equal(converted[n], transferred[n])}
    assert changed and all(".mixer." in n for n in changed)
    assert (tmp_path / "work" / "attention_transfer" / "transfer_report.json").is_file()
    assert "fitted to the donor's attention" in (tmp_path / "models" / "m" / "README.md").read_text()


def test_a_two_stage_job_stopped_inside_and_between_the_stages_resumes_each_from_where_it_was(
        tmp_path, donor, corpus):
    spec = two_stage_spec(donor, corpus, at_steps=6, steps=4)
    work, models = tmp_path / "work", tmp_path / "models" / "m"

    # 1. stopped inside attention transfer, after its step 3: a checkpoint at 2 and one at the stop
    first = []
    stopped = run_pipeline(spec, work, publish_to=models, job_id="job-r", on_event=first.append,
                           should_stop=lambda: any(e["event"] == "train" and e["step"] == 3 for e in first))
    assert stopped.stopped and stopped.attention_transfer["stopped"] and stopped.train is None
    assert [(e["stage"], e["step"]) for e in first if e["event"] == "checkpoint"] == [
        ("attention_transfer", 2), ("attention_transfer", 3)]

    # 2. resumed at its step 3, finished, then stopped between the stages: training not started
    second = []
    between = run_pipeline(spec, work, publish_to=models, job_id="job-r", on_event=second.append,
                           should_stop=lambda: any(e["event"] == "stage" and e["stage"] == "attention_transfer"
                                                   and e["status"] == "done" for e in second))
    assert between.stopped and between.train is None and between.attention_transfer["steps"] == 6
    resume = next(e for e in second if e["event"] == "resume")
    assert (resume["stage"], resume["step"]) == ("attention_transfer", 3)
    assert [e["step"] for e in second if e["event"] == "train"] == [4, 5, 6]
    assert not any(e["event"] == "stage" and e["stage"] == "train" for e in second)
    assert not models.exists()

    # 3. attention transfer is not run again; training runs whole and the model is published
    third = []
    done = run_pipeline(spec, work, publish_to=models, job_id="job-r", on_event=third.append)
    assert not done.stopped and done.model_dir == str(models)
    statuses = {e["stage"]: e["status"] for e in third if e["event"] == "stage" and e["status"] != "started"}
    assert statuses["convert"] == statuses["attention_transfer"] == "skipped" and statuses["train"] == "done"
    assert [(e["stage"], e["step"]) for e in third if e["event"] == "train"] == [("train", s) for s in range(1, 5)]
    assert done.attention_transfer["steps"] == 6


def test_attention_transfer_needs_a_conversion(tmp_path):
    with pytest.raises(ValueError, match="needs a conversion"):
        PipelineSpec(base_model=str(tmp_path), attention_transfer=AttentionTransferStage(
            config=AttentionTransferConfig(max_steps=1)))
