"""Donors are checked against the layout their config describes without building the model
(donors import no model); this keeps that layout the model's own."""

import pytest
import torch

from xatl.config import XatlConfig
from xatl.donors.spec import canonical_shapes
from xatl.model import XatlForCausalLM

SKELETONS = {
    "llama": {},
    "gqa-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "gpt2": {"norm_type": "layernorm", "mlp_type": "plain", "mlp_bias": True, "hidden_act": "gelu_new",
             "position_embedding_type": "learned", "attention_bias": True, "attention_out_bias": True},
    "neox": {"norm_type": "layernorm", "mlp_type": "plain", "parallel_residual": True, "partial_rotary_factor": 0.25,
             "attention_bias": True, "attention_out_bias": True, "mlp_bias": True},
    "qwen2": {"num_key_value_heads": 1, "attention_bias": True, "head_dim": 24},
}


@pytest.mark.parametrize("name", SKELETONS)
def test_canonical_shapes_are_the_models_state_dict(name):
    config = XatlConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, **SKELETONS[name])
    with torch.device("meta"):
        model_shapes = {n: tuple(t.shape) for n, t in XatlForCausalLM(config).state_dict().items()}
    assert list(canonical_shapes(config).items()) == list(model_shapes.items())


def test_a_plan_with_mixers_is_no_donor_layout():
    config = XatlConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        layer_mixers=["gla", "attention"])
    with pytest.raises(ValueError, match="all attention"):
        canonical_shapes(config)
