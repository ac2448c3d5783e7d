"""Models saved at a precision load back at it: an int8 model's safetensors hold int8 linear weights
with float32 scales per row and config.json its `quantization_config`, and
`AutoModelForCausalLM.from_pretrained` (after `import xatl`) gives the same int8 weights and the same
outputs; bf16 saves and loads as bfloat16; the engine and the loader take such folders as saved or
at another precision; `xatl quantize` writes them."""

import json

import pytest
import torch
from safetensors import safe_open
from serving_fixtures import tiny_model
from transformers import AutoModelForCausalLM

from xatl.cli import main
from xatl.loader import load_model
from xatl.quantization import QUANT_METHOD, Int8Linear
from xatl.serving import Engine, apply_precision
from xatl.serving.precision import model_precision

PROMPT = torch.tensor([[1, 7, 42, 99, 5, 260, 3]])
PLAN = ["gla", "attention", "mamba2"]


def _model(vocab_size: int):
    # biases on every projection, so that saving carries them too; the LM head tied to the embedding
    return tiny_model(PLAN, vocab_size, attention_bias=True, attention_out_bias=True, mlp_bias=True,
                      tie_word_embeddings=True)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def _saved(folder) -> dict[str, torch.dtype]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: f.get_slice(name).get_dtype() for name in f.keys()}


def test_an_int8_model_saves_int8_weights_and_scales_and_loads_back_bit_identical(tokenizer, tmp_path):
    model = _model(len(tokenizer))
    biased = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    model = apply_precision(model, "int8")
    linears = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    assert "lm_head" in linears and len(linears) > 10 and biased
    expected = _logits(model)
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert config["quantization_config"]["weights"] == "int8"
    assert config["tie_word_embeddings"] is False  # the LM head has its own int8 weights
    saved = _saved(tmp_path)
    for name in linears:
        assert saved[f"{name}.weight"] == "I8" and saved[f"{name}.weight_scale"] == "F32", name
        assert saved.get(f"{name}.bias") == ("F32" if name in biased else None), name
    assert saved["model.embed_tokens.weight"] == "F32"
    assert not any("packed" in name for name in saved)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model_precision(loaded) == "int8"
    assert [n for n, m in loaded.named_modules() if isinstance(m, Int8Linear)] == linears
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert torch.equal(_logits(loaded), expected)


def test_a_bf16_model_saves_and_loads_as_bf16(tokenizer, tmp_path):
    model = apply_precision(_model(len(tokenizer)), "bf16")
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    assert set(_saved(tmp_path).values()) == {"BF16"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model_precision(loaded) == "bf16"
    assert torch.equal(_logits(loaded), expected)


def test_the_engine_and_the_loader_take_an_int8_folder_as_saved_or_dequantised(tokenizer, tmp_path):
    model = apply_precision(_model(len(tokenizer)), "int8")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = {name: m.int8_weight() for name, m in model.named_modules() if isinstance(m, Int8Linear)}

    assert Engine.from_pretrained(tmp_path, device="cpu", background=False).precision == "int8"  # as saved
    again = Engine.from_pretrained(tmp_path, device="cpu", precision="int8", background=False).model
    assert all(torch.equal(again.get_submodule(n).int8_weight()[0], w[0]) for n, w in weights.items())

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        engine = Engine.from_pretrained(tmp_path, device="cpu", precision=precision, background=False)
        assert engine.precision == precision
        assert "quantization_config" not in engine.model.config.to_dict()
        head = engine.model.lm_head
        assert isinstance(head, torch.nn.Linear) and head.weight.dtype == dtype  # bf16: Bf16Linear, xatl's kernel
        int8, scale, _ = weights["lm_head"]
        assert torch.equal(head.weight, (int8.float() * scale[:, None]).to(dtype))  # dequantised exactly

    trainable, _ = load_model(tmp_path, device="cpu", dtype=torch.float32, dequantize=True)  # to train from
    assert not any(isinstance(m, Int8Linear) for m in trainable.modules())
    assert all(p.dtype == torch.float32 for p in trainable.parameters())
    assert torch.allclose(_logits(trainable), _logits(model), atol=0.1)  # int8 activations aside, the same


def test_xatl_quantize_writes_a_folder_that_loads_at_its_precision(tokenizer, tmp_path, capsys):
    source = tmp_path / "fp32"
    model = _model(len(tokenizer))
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    (source / "README.md").write_text("the card\n")

    assert main(["quantize", str(source), str(tmp_path / "int8"), "--precision", "int8"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    out = tmp_path / "int8"
    assert (out / "README.md").read_text() == "the card\n" and (out / "tokenizer.json").is_file()
    assert (out / "model.safetensors").stat().st_size < (source / "model.safetensors").stat().st_size
    loaded, _ = load_model(out, device="cpu")
    assert model_precision(loaded) == "int8"
    assert torch.equal(_logits(loaded), _logits(apply_precision(model, "int8")))
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "Once", "--max-new-tokens", "3", "--temperature", "0",
                 "--ignore-eos", "--json"]) == 0  # int8 as saved, with no option
    assert json.loads(capsys.readouterr().out)["tokens"] == 3

    assert main(["quantize", str(source), str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert model_precision(load_model(tmp_path / "bf16", device="cpu")[0]) == "bf16"
    assert main(["quantize", str(source), str(out), "--precision", "int8"]) == 2  # out exists
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(source), str(tmp_path / "x"), "--precision", "int4"])
