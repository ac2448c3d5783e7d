"""Models saved with int8 weights, and loaded back int8 by `AutoModelForCausalLM.from_pretrained`.

`xatl.serving.apply_precision(model, "int8")` turns every `nn.Linear` into an `Int8Linear` (torch's
dynamically quantised linear layer, whose weights save as plain tensors) and records the scheme in
`model.config.quantization_config`, so that `model.save_pretrained(out)` writes, for each such layer
`L`, in model.safetensors:

- `L.weight`: int8, (out, in) — the weight is `L.weight * L.weight_scale[:, None]`;
- `L.weight_scale`: float32, one per output row (symmetric: no zero point);
- `L.bias`: float32, as it was;

and in config.json `"quantization_config": {"quant_method": "xatl", "weights": "int8", ...}`, with
`tie_word_embeddings` false (the LM head has its own int8 copy; the input embedding stays float32).

`import xatl` registers quant_method "xatl" with transformers (`register_quantization_config`,
`register_quantizer`): loading such a folder builds the model, puts a slot for the int8 weight and its
scales where each `nn.Linear` was, loads the tensors as saved and packs them for torch's int8 kernels,
so the weights are bit for bit the ones saved. It loads pre-quantised folders only: a float folder
is quantised by loading it and calling `apply_precision`, or with `xatl quantize`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "xatl"

#: the quantised engine's name in torch.backends.quantized, in order of preference
_INT8_ENGINES = ("x86", "fbgemm", "onednn")


def use_int8_engine() -> str:
    """Select torch's int8 CPU engine (weights are packed for, and run on, the engine selected)."""
    engine = next((name for name in _INT8_ENGINES if name in torch.backends.quantized.supported_engines), None)
    if engine is None:
        raise ValueError(f"this torch build has no int8 CPU engine (has {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = engine
    return engine


class Int8Linear(DynamicQuantizedLinear):
    """torch's dynamically quantised linear layer (same kernels, same outputs) whose state dict is
    plain tensors, `weight` (int8), `weight_scale` (float32 per output row) and `bias`, instead of
    torch's packed-parameter objects, which safetensors cannot hold."""

    def __init__(self, in_features: int, out_features: int, bias_: bool = True, dtype=torch.qint8):
        super().__init__(in_features, out_features, bias_=bias_, dtype=dtype)
        self.register_state_dict_post_hook(_plain_tensors)

    @classmethod
    def from_int8(cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """The layer of int8 `weight` (out, in) with one float `scale` per output row."""
        out_features, in_features = weight.shape
        use_int8_engine()
        with warnings.catch_warnings():  # torch announces the quantized tensors' move to torchao; 2.13 has them
            warnings.simplefilter("ignore")
            layer = cls(in_features, out_features)
            zero_points = torch.zeros(out_features, dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(weight.to(torch.int8), scale.double(), zero_points, 0)
            layer.set_weight_bias(qweight, None if bias is None else bias.float())
        return layer

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 weight (out, in), float32 scale per row, bias or None), as saved."""
        qweight, bias = self._weight_bias()
        if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            if qweight.q_per_channel_zero_points().any():
                raise ValueError("an int8 weight with zero points other than 0 (only symmetric ones save)")
            scale = qweight.q_per_channel_scales().float()
        else:  # one scale for the whole matrix
            if qweight.q_zero_point() != 0:
                raise ValueError("an int8 weight with a zero point other than 0 (only symmetric ones save)")
            scale = torch.full((qweight.shape[0],), qweight.q_scale(), dtype=torch.float32)
        return qweight.int_repr(), scale, bias

    def dequantized(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """An `nn.Linear` holding this layer's weights, dequantised to `dtype`."""
        weight, scale, bias = self.int8_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.float() * scale[:, None])
            if bias is not None:
                linear.bias.copy_(bias)
        return linear

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = [prefix + "weight", prefix + "weight_scale"]
        if not all(name in state_dict for name in names):
            missing_keys.extend(name for name in names if name not in state_dict)
            return
        weight, scale = state_dict.pop(names[0]), state_dict.pop(names[1])
        loaded = Int8Linear.from_int8(weight, scale, state_dict.pop(prefix + "bias", None))
        # the packed-parameter child loads next, from these keys (torch's first state-dict layout)
        state_dict[prefix + "_packed_params.weight"], state_dict[prefix + "_packed_params.bias"] = \
            loaded._weight_bias()


def _plain_tensors(module: Int8Linear, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "_packed_params.")]:
        del state_dict[key]
    for key in ("scale", "zero_point"):  # the activations' (dynamic: computed at run time, unused)
        state_dict.pop(prefix + key, None)
    weight, scale, bias = module.int8_weight()
    state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = weight, scale
    if bias is not None:
        state_dict[prefix + "bias"] = bias


class XatlQuantizationConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of a model saved with int8 linear layers.

    Args:
        weights: "int8" (the one scheme: per output row, symmetric).
        activations: "dynamic-int8" (quantised at run time, one scale per input tensor).
        modules_not_converted: names of `nn.Linear` modules kept in float (none by default).
    """

    def __init__(self, weights: str = "int8", activations: str = "dynamic-int8",
                 modules_not_converted: list[str] | None = None, **kwargs):
        if weights != "int8" or activations != "dynamic-int8":
            raise ValueError(f"xatl quantization saves int8 weights with dynamic int8 activations, got "
                             f"weights={weights!r}, activations={activations!r}")
        self.quant_method = QUANT_METHOD
        self.weights = weights
        self.activations = activations
        self.modules_not_converted = list(modules_not_converted or [])

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "weights": self.weights, "activations": self.activations,
                "modules_not_converted": self.modules_not_converted}


class _Int8Slots(nn.Module):
    """Where an `nn.Linear` was, while the checkpoint loads: its saved int8 weight, scales and bias,
    turned into an `Int8Linear` once loaded."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32)) if bias else None


class XatlQuantizer(HfQuantizer):
    """Loads folders saved with `XatlQuantizationConfig` (pre-quantised only); CPU only."""

    requires_calibration = True  # quantising float weights on load: apply_precision instead

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and any(str(d) not in ("cpu", "disk") for d in device_map.values()):
            raise ValueError("int8 weights run on the CPU only (torch has no int8 dynamic linear for GPUs)")

    def update_dtype(self, dtype):
        return torch.float32 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        skip = set(self.quantization_config.modules_not_converted)
        _replace_linears(model, lambda name, linear: None if name in skip else _Int8Slots(
            linear.in_features, linear.out_features, linear.bias is not None))

    def _process_model_after_weight_loading(self, model, **kwargs):
        for parent, child_name, slots in _children(model, _Int8Slots):
            setattr(parent, child_name, Int8Linear.from_int8(slots.weight.data, slots.weight_scale.data,
                                                             None if slots.bias is None else slots.bias.data))
        return model

    def _dequantize(self, model, dtype=None):
        return dequantize_int8(model, dtype or torch.float32)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False


def _children(model: nn.Module, kind: type):
    """(parent, attribute name, module) for each module of type `kind`."""
    return [(parent, name, child) for parent in list(model.modules())
            for name, child in list(parent.named_children()) if type(child) is kind]


def _replace_linears(model: nn.Module, make) -> None:
    names = {module: name for name, module in model.named_modules()}
    for parent, child_name, linear in _children(model, nn.Linear):
        replacement = make(names[linear], linear)
        if replacement is not None:
            setattr(parent, child_name, replacement)


def mark_int8(model: nn.Module) -> None:
    """Record int8 weights in the model's config (`quantization_config`; the LM head untied: it has
    its own int8 weights), so that `save_pretrained` writes a folder that loads back int8."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config.quantization_config = XatlQuantizationConfig()
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def dequantize_int8(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`model` with each `Int8Linear` back as an `nn.Linear` of the dequantised weights (in place),
    and no quantization config: float weights that equal the int8 ones times their scales."""
    for parent, child_name, layer in _children(model, Int8Linear):
        setattr(parent, child_name, layer.dequantized(dtype))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for name in ("hf_quantizer", "quantization_method"):
        if name in vars(model):
            delattr(model, name)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def register() -> None:
    """quant_method "xatl" in transformers' tables (once)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(XatlQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(XatlQuantizer)


__all__ = ["QUANT_METHOD", "Int8Linear", "XatlQuantizationConfig", "XatlQuantizer", "dequantize_int8", "mark_int8",
           "register", "use_int8_engine"]
