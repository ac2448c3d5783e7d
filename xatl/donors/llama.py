"""Llama and the families of the same shape: Qwen2 (biases on q/k/v) and Mistral.

RMSNorm, SwiGLU MLP, rotate-half RoPE on whole heads, grouped-query attention, sequential
residual, head tied or not. Sliding-window attention changes what a token attends to once the
sequence is longer than the window, so a window shorter than the context is refused.
"""

from __future__ import annotations

from xatl.donors.mapping import Family, rope_settings, special_token_ids
from xatl.donors.spec import DonorError


def _llama_shape(config: dict, *, qkv_bias: bool, out_bias: bool) -> dict:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or hidden // heads,
        "hidden_act": config.get("hidden_act", "silu"),
        "mlp_type": "gated",
        "mlp_bias": config.get("mlp_bias", False),
        "norm_type": "rmsnorm",
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "position_embedding_type": "rotary",
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        **rope_settings(config),
        "attention_bias": qkv_bias,
        "attention_out_bias": out_bias,
        "parallel_residual": False,
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        **special_token_ids(config, config["vocab_size"]),
    }


def _refuse_short_window(family: str, window: int | None, context: int, layers: str) -> None:
    if window is not None and window < context:
        raise DonorError(
            f"{family} donor uses sliding-window attention (sliding_window={window}) in {layers}, "
            f"shorter than its context (max_position_embeddings={context}); xatl's attention sees "
            "the whole sequence, so the maths would differ"
        )


def read_llama_config(config: dict) -> dict:
    bias = config.get("attention_bias", False)
    return _llama_shape(config, qkv_bias=bias, out_bias=bias)


def read_qwen2_config(config: dict) -> dict:
    layers = config["num_hidden_layers"]
    if config.get("use_sliding_window", False):
        layer_types = config.get("layer_types") or [
            "sliding_attention" if i >= config.get("max_window_layers", 28) else "full_attention"
            for i in range(layers)
        ]
        sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        if sliding:
            _refuse_short_window("Qwen2", config.get("sliding_window"),
                                 config.get("max_position_embeddings", 32768), f"layers {sliding}")
    return _llama_shape(config, qkv_bias=True, out_bias=False)


def read_mistral_config(config: dict) -> dict:
    _refuse_short_window("Mistral", config.get("sliding_window"),
                         config.get("max_position_embeddings", 32768), "every layer")
    return _llama_shape(config, qkv_bias=False, out_bias=False)


_LAYER = "model.layers.{}."
WEIGHT_MAP = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight": _LAYER + "input_layernorm.weight",
    **{
        f"model.layers.{{}}.self_attn.{proj}.{kind}": f"{_LAYER}mixer.{proj}.{kind}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
        for kind in ("weight", "bias")
    },
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.post_attention_layernorm.weight": _LAYER + "post_attention_layernorm.weight",
    **{
        f"model.layers.{{}}.mlp.{proj}.{kind}": f"{_LAYER}mlp.{proj}.{kind}"
        for proj in ("gate_proj", "up_proj", "down_proj")
        for kind in ("weight", "bias")
    },
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

LLAMA = Family("llama", read_llama_config, WEIGHT_MAP, base_prefix="model.")
QWEN2 = Family("qwen2", read_qwen2_config, WEIGHT_MAP, base_prefix="model.")
MISTRAL = Family("mistral", read_mistral_config, WEIGHT_MAP, base_prefix="model.")
