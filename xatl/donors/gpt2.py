"""GPT-2: learned positions, LayerNorm, plain GELU MLP, biases everywhere, tied head.

Its Linear layers are Conv1D, stored (in, out), and its q/k/v are one fused `c_attn`
(in, 3 * hidden) laid out as [q | k | v] along the output dimension.
"""

from __future__ import annotations

from xatl.donors.mapping import Family, SplitThirds, Transposed, refuse, special_token_ids


def read_config(config: dict) -> dict:
    refuse(config, "GPT-2", {
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
    })
    hidden = config["n_embd"]
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": config.get("n_inner") or 4 * hidden,
        "num_hidden_layers": config["n_layer"],
        "num_attention_heads": config["n_head"],
        "hidden_act": config.get("activation_function", "gelu_new"),
        "mlp_type": "plain",
        "mlp_bias": True,
        "norm_type": "layernorm",
        "norm_eps": config.get("layer_norm_epsilon", 1e-5),
        "position_embedding_type": "learned",
        "max_position_embeddings": config["n_positions"],
        "attention_bias": True,
        "attention_out_bias": True,
        "parallel_residual": False,
        "tie_word_embeddings": config.get("tie_word_embeddings", True),
        **special_token_ids(config, config["vocab_size"]),
    }


_LAYER = "model.layers.{}."
WEIGHT_MAP = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.wpe.weight": "model.embed_positions.weight",
    "transformer.h.{}.ln_1.weight": _LAYER + "input_layernorm.weight",
    "transformer.h.{}.ln_1.bias": _LAYER + "input_layernorm.bias",
    "transformer.h.{}.attn.c_attn.weight": SplitThirds(
        _LAYER + "mixer.q_proj.weight", _LAYER + "mixer.k_proj.weight", _LAYER + "mixer.v_proj.weight",
        dim=1, transpose=True,
    ),
    "transformer.h.{}.attn.c_attn.bias": SplitThirds(
        _LAYER + "mixer.q_proj.bias", _LAYER + "mixer.k_proj.bias", _LAYER + "mixer.v_proj.bias", dim=0
    ),
    "transformer.h.{}.attn.c_proj.weight": Transposed(_LAYER + "mixer.o_proj.weight"),
    "transformer.h.{}.attn.c_proj.bias": _LAYER + "mixer.o_proj.bias",
    "transformer.h.{}.attn.bias": None,  # causal mask buffer
    "transformer.h.{}.attn.masked_bias": None,
    "transformer.h.{}.ln_2.weight": _LAYER + "post_attention_layernorm.weight",
    "transformer.h.{}.ln_2.bias": _LAYER + "post_attention_layernorm.bias",
    "transformer.h.{}.mlp.c_fc.weight": Transposed(_LAYER + "mlp.up_proj.weight"),
    "transformer.h.{}.mlp.c_fc.bias": _LAYER + "mlp.up_proj.bias",
    "transformer.h.{}.mlp.c_proj.weight": Transposed(_LAYER + "mlp.down_proj.weight"),
    "transformer.h.{}.mlp.c_proj.bias": _LAYER + "mlp.down_proj.bias",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.ln_f.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",
}

FAMILY = Family("gpt2", read_config, WEIGHT_MAP, base_prefix="transformer.")
