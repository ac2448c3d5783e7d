"""`xatl generate`: the text streams, the figures come at the end (one JSON object with --json)."""

import json

import pytest
from serving_fixtures import tiny_model

from xatl.cli import main


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    model = tiny_model(["gla", "attention"], len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_json_figures_at_the_end(model_dir, capsys):
    code = main(["generate", str(model_dir), "--prompt", "Once upon", "--max-new-tokens", "7",
                 "--temperature", "0", "--ignore-eos", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    figures = json.loads(out)
    assert figures["tokens"] == 7 and figures["finish_reason"] == "length"
    assert figures["tokens_per_s"] > 0 and 0 < figures["ttft_s"] <= figures["e2e_s"]
    assert figures["state_bytes"] > 0
    assert err == figures["text"] + "\n"  # the text streamed to stderr


def test_text_on_stdout_figures_on_stderr(model_dir, capsys):
    code = main(["generate", str(model_dir), "--prompt", "Once", "--max-new-tokens", "5", "--seed", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "5 tokens (length)" in err or "(stop)" in err
    assert "tokens/s" in err and "state" in err
    again = main(["generate", str(model_dir), "--prompt", "Once", "--max-new-tokens", "5", "--seed", "1"])
    assert again == 0 and capsys.readouterr().out == out  # a seed reproduces the text


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--top-p", "2"], "top_p"),
    ],
)
def test_bad_options_exit_2_with_one_line(model_dir, capsys, arguments, message):
    assert main(["generate", str(model_dir), "--prompt", "x", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_folder_without_a_model_exits_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("option,precision", [("--precision", "bf16"), ("--precision", "int8"), ("--dtype", "int8")])
def test_precision_option(model_dir, capsys, option, precision):
    code = main(["generate", str(model_dir), "--prompt", "Once upon", "--max-new-tokens", "4",
                 "--temperature", "0", "--ignore-eos", "--json", option, precision])
    assert code == 0 and json.loads(capsys.readouterr().out)["tokens"] == 4


def test_an_unknown_precision_exits_2(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(model_dir), "--prompt", "x", "--precision", "int4"])
    assert exit_.value.code == 2 and "--precision" in capsys.readouterr().err
