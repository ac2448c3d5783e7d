"""Transfer modes and the transfer report, on an in-memory donor (the donor loaders have their
own tests; here the donor is a random all-attention XatlForCausalLM)."""

import json

import pytest
import torch

import xatl
from xatl.donors import Donor
from xatl.mixers import MIXERS, get_mixer_class
from xatl.transfer import TRANSFER_MODES, build_target_config, transfer_weights

LINEAR_MIXERS = [m for m in MIXERS if m != "attention"]


def make_donor(**overrides) -> Donor:
    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2)
    config = xatl.XatlConfig(**{**settings, **overrides})
    torch.manual_seed(123)
    model = xatl.XatlForCausalLM(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Donor(config=config, state_dict=state, tokenizer=None, model_type="test", source="memory")


def convert(donor, mixer, mode, attention_layers=()):
    return xatl.convert(donor, mixer=mixer, transfer=mode, attention_layers=attention_layers)


@pytest.mark.parametrize("mixer", LINEAR_MIXERS)
@pytest.mark.parametrize("mode", TRANSFER_MODES)
def test_every_copied_tensor_is_bit_identical_to_its_donor_source(mixer, mode):
    donor = make_donor()
    result = convert(donor, mixer, mode, attention_layers=[1])
    params = dict(result.model.named_parameters(remove_duplicate=False))
    copied = [t for t in result.report.tensors if t.origin == "copied"]
    for t in copied:
        assert len(t.donor_tensors) == 1, t.name
        assert torch.equal(params[t.name], donor.state_dict[t.donor_tensors[0]]), t.name
    names = {t.name for t in copied}
    initialised = {t.name for t in result.report.tensors if t.origin == "initialised"}
    out_proj = [f"model.layers.{i}.mixer.{get_mixer_class(mixer).output_projection}.weight" for i in (0, 2)]
    attention_layer = {n for n in params if n.startswith("model.layers.1.mixer.")}
    if mode == "none":
        assert not names and not initialised
    if mode == "embeddings-only":
        assert names == {"model.embed_tokens.weight", "lm_head.weight"}
    if mode in ("xatl-no-oproj", "xatl", "xatl+qkv"):
        assert {"model.norm.weight", "model.layers.0.mlp.up_proj.weight",
                "model.layers.2.input_layernorm.weight"} <= names
        assert attention_layer <= names  # the kept attention layer arrives whole
    if mode == "xatl-no-oproj":
        assert not any(n.startswith(("model.layers.0.mixer.", "model.layers.2.mixer.")) for n in names)
    if mode in ("xatl", "xatl+qkv"):
        assert set(out_proj) <= names | initialised
    if mode == "xatl+qkv":
        mixer_inputs = {n for n in initialised | names
                        if n.startswith("model.layers.0.mixer.") and n not in out_proj}
        assert mixer_inputs, "xatl+qkv set none of the mixer's input projections"


def test_attention_everywhere_rebuilds_the_donor_exactly():
    donor = make_donor(tie_word_embeddings=True)
    result = convert(donor, "attention", "xatl")
    reference = xatl.XatlForCausalLM(donor.config).eval()
    reference.load_state_dict(donor.state_dict)
    ids = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(result.model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    summary = result.report.summary()
    assert summary["fraction_copied"] == 1.0
    assert [t.origin for t in result.report.tensors if t.name == "lm_head.weight"] == ["tied"]


def test_report_is_json_and_its_summary_adds_up(tmp_path):
    donor = make_donor()
    result = xatl.convert(donor, mixer="attention", attention_layers=[0], transfer="embeddings-only",
                          out=tmp_path)
    report = json.loads((tmp_path / "transfer_report.json").read_text())
    assert report == xatl.read_transfer_report(tmp_path)
    summary = report["summary"]
    total = sum(t["numel"] for t in report["tensors"] if t["origin"] != "tied")
    assert summary["parameters"] == total == sum(p.numel() for p in result.model.parameters())
    assert summary["copied_parameters"] == sum(t["numel"] for t in report["tensors"] if t["origin"] == "copied")
    assert 0 < summary["fraction_copied"] < 1


def test_random_initialisation_is_seeded():
    donor = make_donor()
    first = xatl.convert(donor, mixer="attention", transfer="none", seed=7).model.state_dict()
    second = xatl.convert(donor, mixer="attention", transfer="none", seed=7).model.state_dict()
    third = xatl.convert(donor, mixer="attention", transfer="none", seed=8).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], third["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(attention_layers=[3]), "attention layer index 3 is out of range"),
        (dict(attention_layers=[-1]), "out of range"),
        (dict(attention_layers=[1, 1]), "repeat"),
        (dict(transfer="everything"), "unknown transfer mode"),
        (dict(mixer="transformer-xl"), "unknown mixer"),
    ],
)
def test_bad_plans_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        xatl.convert(make_donor(), **{"mixer": "attention", **kwargs})


def test_shape_mismatch_names_the_tensor():
    donor = make_donor()
    donor.state_dict["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.0\.mlp\.up_proj\.weight"):
        xatl.convert(donor, mixer="attention")


def test_target_config_keeps_the_skeleton_and_sets_the_plan():
    donor = make_donor(norm_type="layernorm", mlp_type="plain", hidden_act="gelu_new")
    config = build_target_config(donor.config, "attention", [0, 2])
    assert config.layer_mixers == ["attention"] * 3
    for field in ("norm_type", "mlp_type", "hidden_act", "num_key_value_heads", "vocab_size"):
        assert getattr(config, field) == getattr(donor.config, field)


def test_unknown_transfer_mode_in_transfer_weights():
    donor = make_donor()
    with pytest.raises(ValueError, match="unknown transfer mode"):
        transfer_weights(donor, xatl.XatlForCausalLM(donor.config), "some")
