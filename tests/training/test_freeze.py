import pytest
import torch
from torch import nn
from training_fixtures import corpus_blocks, parameters, skeleton_names, tiny_model

from xatl.convert import convert
from xatl.donors.spec import Donor
from xatl.training import TrainConfig, parse_freeze, read_tensor_origins, train, transferred_names
from xatl.training.freeze import FixedSteps, LossImprovementThreshold, NoFreeze, WeightNormPeak


@pytest.mark.parametrize(
    "spec,kind,attributes",
    [
        ("none", NoFreeze, {}),
        ("steps:25", FixedSteps, {"steps": 25}),
        ("lit", LossImprovementThreshold, {"window": 50, "threshold": 0.01, "patience": 2}),
        ("lit:window=20,threshold=0.05", LossImprovementThreshold, {"window": 20, "threshold": 0.05}),
        ("norm-peak:patience=4", WeightNormPeak, {"patience": 4}),
    ],
)
def test_parse_freeze(spec, kind, attributes):
    schedule = parse_freeze(spec)
    assert type(schedule) is kind
    assert {k: getattr(schedule, k) for k in attributes} == attributes


@pytest.mark.parametrize(
    "spec,message",
    [
        ("sometimes", "unknown freeze schedule"),
        ("steps:x", "steps:N"),
        ("steps:0", "N >= 1"),
        ("lit:window=ten", "window must be a int"),
        ("lit:speed=3", "bad argument"),
        ("lit:threshold=2", "threshold must be in"),
        ("norm-peak:threshold=0.1", "takes no argument"),
    ],
)
def test_bad_freeze_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_freeze(spec)


def test_loss_improvement_threshold_waits_for_patience_windows_of_small_gains():
    rule = LossImprovementThreshold(window=3, threshold=0.05, patience=2)
    window_means = [10.0, 8.0, 7.9, 7.5, 7.45, 7.44]  # gains: 20%, 1.25%, 5.1%, 0.7%, 0.1%
    decisions = [rule.observe(step, loss, None)
                 for step, loss in enumerate((m for m in window_means for _ in range(3)), start=1)]
    # a small gain (7.9) is forgiven by the next big one (7.5); two small ones in a row (7.45, 7.44)
    # release at the end of the sixth window
    assert decisions.index(True) + 1 == 18
    assert not any(decisions[:17])


def test_weight_norm_peak_releases_after_the_trained_weights_stop_growing():
    layer = nn.Linear(4, 4, bias=False)
    rule = WeightNormPeak(window=2, patience=2)
    decisions = []
    for step, scale in enumerate([1, 2, 3, 4, 5, 4.9, 4.8, 4.7, 5.5, 5.4, 5.3, 5.2, 5.1, 5.0], start=1):
        with torch.no_grad():
            layer.weight.fill_(scale)
        decisions.append(rule.observe(step, 0.0, layer))
    # measured every 2 steps: 2, 4, 4.9 (peak), 4.7 (below: 1), 5.4 (new peak: back to 0),
    # 5.2 (1), 5.0 (2) -> released at step 14
    assert decisions.index(True) + 1 == 14
    assert not any(decisions[:13])


def _donor():
    model = tiny_model(("attention", "attention"), seed=1)
    return Donor(config=model.config, state_dict=model.state_dict(), tokenizer=None, model_type="test",
                 source="memory")


@pytest.mark.parametrize("mode", ["xatl", "xatl+qkv"])
def test_transferred_names_follow_the_report_convert_writes(tmp_path, mode):
    result = convert(_donor(), mixer="mamba2", attention_layers=[1], transfer=mode, out=tmp_path)
    report = {t.name: t.origin for t in result.report.tensors}
    origins = read_tensor_origins(tmp_path)
    assert set(origins) == {n for n, o in report.items() if o != "tied"}
    copied = transferred_names(origins)
    assert copied == {n for n, o in report.items() if o == "copied"}
    assert "model.layers.0.mixer.out_proj.weight" in copied  # W_O in xatl mode
    assert "model.layers.1.mixer.q_proj.weight" in copied  # the attention layer of the hybrid, whole
    with_initialised = transferred_names(origins, include_initialised=True)
    assert with_initialised == {n for n, o in report.items() if o in ("copied", "initialised")}
    assert with_initialised > copied if mode == "xatl+qkv" else with_initialised >= copied


def test_missing_report_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="transfer_report.json"):
        read_tensor_origins(tmp_path)


def test_steps_schedule_holds_transferred_weights_then_trains_them(tokenizer):
    model = tiny_model(("mamba2", "attention"), vocab_size=len(tokenizer))
    transferred = set(skeleton_names(model))
    snapshots, events = [], []

    def on_step(event):
        events.append(event)
        if event["event"] == "train":
            snapshots.append(parameters(model))

    start = parameters(model)
    config = TrainConfig(max_steps=5, batch_size=4, lr=1e-2, freeze="steps:3", unfreeze_warmup_steps=2)
    result = train(model, corpus_blocks(tokenizer), config, transferred=transferred, on_step=on_step)
    assert result.unfreeze_step == 3
    assert [e["step"] for e in events if e["event"] == "unfreeze"] == [3]
    assert [e["frozen"] for e in events if e["event"] == "train"] == [True, True, False, False, False]
    for name in start:
        moved = [not torch.equal(s[name], start[name]) for s in snapshots]
        if name in transferred:
            assert moved == [False, False, False, True, True], name
        else:
            assert all(moved), name
