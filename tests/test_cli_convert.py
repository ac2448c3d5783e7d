"""`xatl convert` as a user runs it: a real process on a donor directory, the saved model loaded
back through transformers' Auto classes, and one-line errors with exit status 2."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import xatl
from xatl.cli import main
from xatl.mixers import MIXERS

XATL = Path(sys.executable).parent / "xatl"  # the console script the package installs


def run_process(*args):
    return subprocess.run([str(XATL), *map(str, args)], capture_output=True, text=True)


def run_cli(*args):
    """The CLI in this process (a real process costs seconds of imports; two tests use one)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def llama_donor(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("mixer", [m for m in MIXERS if m != "attention"])
def test_convert_saves_a_model_that_auto_classes_load(tmp_path, llama_donor, mixer):
    out = tmp_path / "out"
    run = run_process if mixer == "mamba2" else run_cli
    done = run("convert", llama_donor, "--mixer", mixer, "--attention-layers", "1", "--transfer", "xatl+qkv",
               "--out", out)
    assert done.returncode == 0, done.stderr
    assert "transferred" in done.stdout
    for name in ("config.json", "model.safetensors", "transfer_report.json"):
        assert (out / name).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "xatl"
    assert config["layer_mixers"] == [mixer, "attention", mixer]

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    in_memory = xatl.convert(str(llama_donor), mixer=mixer, attention_layers=[1], transfer="xatl+qkv").model
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, in_memory(ids).logits, rtol=0, atol=0)
    assert loaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (2, 13)


def test_mixer_options_reach_the_config(tmp_path, llama_donor):
    done = run_cli("convert", llama_donor, "--mixer", "mamba", "--mixer-option", "state_size=4",
                   "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "config.json").read_text())["mixer_options"]["mamba"]["state_size"] == 4


def _no_traceback(done, *fragments):
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


def test_attention_layer_out_of_range(tmp_path, llama_donor):
    _no_traceback(run_cli("convert", llama_donor, "--attention-layers", "3", "--out", tmp_path),
                  "attention layer index 3 is out of range")


def test_missing_donor(tmp_path):
    _no_traceback(run_process("convert", tmp_path / "nowhere", "--out", tmp_path / "o"), "does not exist")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    _no_traceback(run_cli("convert", tmp_path, "--out", tmp_path / "o"), "bert")


def test_pickle_only_checkpoint_is_refused(tmp_path, llama_donor):
    (tmp_path / "config.json").write_text((llama_donor / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    _no_traceback(run_cli("convert", tmp_path, "--out", tmp_path / "o"), "safetensors")


def test_mismatched_shapes(tmp_path, llama_donor):
    (tmp_path / "config.json").write_text((llama_donor / "config.json").read_text())
    weights = load_file(llama_donor / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _no_traceback(run_cli("convert", tmp_path, "--out", tmp_path / "o"), "model.layers.0.mlp.up_proj.weight")


def test_bad_mixer_option(tmp_path, llama_donor):
    _no_traceback(run_cli("convert", llama_donor, "--mixer", "mamba2", "--mixer-option", "colour=blue",
                          "--out", tmp_path), "colour")


def test_every_entry_point_defaults_to_the_same_mixer():
    """`xatl convert`, `xatl.convert`, the pipeline and a job spec without a mixer all build the
    library's DEFAULT_MIXER; the torch-free job specs keep their own copy of the library's names."""
    import argparse
    import inspect

    from worker import specs
    from xatl.cli import convert as convert_command
    from xatl.mixers import DEFAULT_MIXER
    from xatl.pipeline import ConvertStage
    from xatl.serving import PRECISIONS
    from xatl.transfer import TRANSFER_MODES

    assert set(specs.MIXERS) == set(MIXERS) and specs.TRANSFERS == TRANSFER_MODES
    assert specs.PRECISIONS == PRECISIONS
    parser = argparse.ArgumentParser()
    convert_command.add_arguments(parser)
    convert_args = parser.parse_args(["donor", "--out", "out"])
    job = specs.ConversionJob(type="conversion", donor="file-1")
    defaults = {
        "xatl convert": convert_args.mixer,
        "xatl.convert": inspect.signature(xatl.convert).parameters["mixer"].default,
        "ConvertStage": ConvertStage(donor="d").mixer,
        "ConversionJob": job.mixer,
        "worker.specs.DEFAULT_MIXER": specs.DEFAULT_MIXER,
    }
    assert defaults == dict.fromkeys(defaults, DEFAULT_MIXER)
