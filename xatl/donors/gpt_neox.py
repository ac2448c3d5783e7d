"""GPT-NeoX / Pythia: LayerNorm, plain GELU MLP, partial rotary (rotate-half on the first
`rotary_pct` of each head), parallel residual by default, untied `embed_out` head.

Its q/k/v are one fused `query_key_value` whose rows are grouped per head as (heads, 3, head_dim).
"""

from __future__ import annotations

from xatl.donors.mapping import Family, SplitPerHead, rope_settings, special_token_ids


def read_config(config: dict) -> dict:
    bias = config.get("attention_bias", True)
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "hidden_act": config.get("hidden_act", "gelu"),
        "mlp_type": "plain",
        "mlp_bias": True,
        "norm_type": "layernorm",
        "norm_eps": config.get("layer_norm_eps", 1e-5),
        "position_embedding_type": "rotary",
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        **rope_settings(config, default_partial=0.25),
        "attention_bias": bias,
        "attention_out_bias": bias,
        "parallel_residual": config.get("use_parallel_residual", True),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        **special_token_ids(config, config["vocab_size"]),
    }


_LAYER = "model.layers.{}."
_QKV = (_LAYER + "mixer.q_proj.", _LAYER + "mixer.k_proj.", _LAYER + "mixer.v_proj.")
WEIGHT_MAP = {
    "gpt_neox.embed_in.weight": "model.embed_tokens.weight",
    "gpt_neox.layers.{}.input_layernorm.weight": _LAYER + "input_layernorm.weight",
    "gpt_neox.layers.{}.input_layernorm.bias": _LAYER + "input_layernorm.bias",
    "gpt_neox.layers.{}.attention.query_key_value.weight": SplitPerHead(*(p + "weight" for p in _QKV)),
    "gpt_neox.layers.{}.attention.query_key_value.bias": SplitPerHead(*(p + "bias" for p in _QKV)),
    "gpt_neox.layers.{}.attention.dense.weight": _LAYER + "mixer.o_proj.weight",
    "gpt_neox.layers.{}.attention.dense.bias": _LAYER + "mixer.o_proj.bias",
    "gpt_neox.layers.{}.attention.bias": None,  # causal mask buffer
    "gpt_neox.layers.{}.attention.masked_bias": None,
    "gpt_neox.layers.{}.attention.rotary_emb.inv_freq": None,
    "gpt_neox.layers.{}.post_attention_layernorm.weight": _LAYER + "post_attention_layernorm.weight",
    "gpt_neox.layers.{}.post_attention_layernorm.bias": _LAYER + "post_attention_layernorm.bias",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": _LAYER + "mlp.up_proj.weight",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.bias": _LAYER + "mlp.up_proj.bias",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": _LAYER + "mlp.down_proj.weight",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias": _LAYER + "mlp.down_proj.bias",
    "gpt_neox.final_layer_norm.weight": "model.norm.weight",
    "gpt_neox.final_layer_norm.bias": "model.norm.bias",
    "embed_out.weight": "lm_head.weight",
}

FAMILY = Family("gpt_neox", read_config, WEIGHT_MAP, base_prefix="gpt_neox.")
