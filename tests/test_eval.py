import json
import math
import sys
from pathlib import Path

import pytest
import torch

from xatl.cli import main
from xatl.data import pack_blocks
from xatl.eval import evaluate_loss, evaluate_text, run_lm_eval

sys.path.insert(0, str(Path(__file__).parent / "training"))
from training_fixtures import build_tokenizer, documents, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("model")
    tiny_model(("attention", "attention"), vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_one_window_gives_the_models_own_loss_and_every_target_counts():
    model = tiny_model(vocab_size=300).eval()
    stream = torch.randint(3, 300, (50,), generator=torch.Generator().manual_seed(0))
    whole = evaluate_loss(model, [stream], batch_size=4)
    with torch.no_grad():
        expected = model(input_ids=stream[None], labels=stream[None]).loss.item()
    assert whole.tokens == 49
    assert whole.loss == pytest.approx(expected, rel=1e-6)
    assert whole.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    # shorter windows: still every token after the first, once; the batch size changes nothing
    blocks = [torch.tensor(b) for b in pack_blocks([stream.tolist()], 8, keep_partial=True)]
    by_one, by_three = evaluate_loss(model, blocks, batch_size=1), evaluate_loss(model, blocks, batch_size=3)
    assert by_one.tokens == by_three.tokens == 49
    assert by_one.loss == pytest.approx(by_three.loss, rel=1e-6)


def test_nothing_to_evaluate_is_an_error():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_loss(tiny_model(vocab_size=300), [])


def test_xatl_eval_prints_one_json_object(model_dir, tokenizer, tmp_path, capsys):
    text = tmp_path / "valid.txt"
    text.write_text("\n".join(documents(5, seed=3)))
    assert main(["eval", str(model_dir), "--data", str(text), "--block-size", "32", "--json"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    result = json.loads(printed[0])
    assert set(result) == {"loss", "perplexity", "tokens"}
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    model = tiny_model(("attention", "attention"), vocab_size=len(tokenizer))
    expected = evaluate_text(model.eval(), tokenizer, [text], block_size=32)
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6) and result["tokens"] == expected.tokens
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lm_evaluation_harness_scores_a_local_task_with_our_log_likelihoods(model_dir, tokenizer, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = [
        {"context": "the cat saw", "choices": ["the red ball.", "a blue boat."], "label": 0},
        {"context": "my sister liked", "choices": ["a green tree.", "the big house."], "label": 1},
    ]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "xatl_tiny.yaml").write_text(
        "task: xatl_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    results = run_lm_eval(model_dir, ["xatl_tiny"], include_path=tmp_path / "tasks", include_defaults=False,
                          log_samples=True)

    model = tiny_model(("attention", "attention"), vocab_size=len(tokenizer)).eval()

    def log_likelihood(context: str, continuation: str) -> float:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits.log_softmax(-1)[0, len(context_ids) - 1:-1]
        return logprobs.gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()

    samples = sorted(results["samples"]["xatl_tiny"], key=lambda s: s["doc_id"])
    for sample, item in zip(samples, items, strict=True):
        harness = [response[0][0] for response in sample["resps"]]
        # the harness joins context and choice with its default target delimiter, a space
        ours = [log_likelihood(item["context"], " " + choice) for choice in item["choices"]]
        assert harness == pytest.approx(ours, abs=1e-4)
        assert sample["acc"] == float(max(range(2), key=lambda i: ours[i]) == item["label"])
    accuracy = results["results"]["xatl_tiny"]["acc,none"]
    assert accuracy == pytest.approx(sum(s["acc"] for s in samples) / len(samples))


def test_xatl_lm_eval_runs_the_harness_command_line_on_a_saved_model(model_dir, tmp_path, monkeypatch):
    from xatl.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = [{"context": "the cat saw", "choices": ["the red ball.", "a blue boat."], "label": 0}]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "xatl_cli_tiny.yaml").write_text(
        "task: xatl_cli_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    code = main(["lm-eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
                 "--tasks", "xatl_cli_tiny", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                 "--output_path", str(tmp_path / "out")])
    assert code == 0
    written = list((tmp_path / "out").rglob("results*.json"))
    assert written, "the harness wrote no results"
    results = json.loads(written[0].read_text())["results"]["xatl_cli_tiny"]
    assert results["acc,none"] in (0.0, 1.0)

