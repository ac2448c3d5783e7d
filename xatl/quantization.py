"""int8 weights: the layer that runs them, and models saved with them that
`AutoModelForCausalLM.from_pretrained` loads back int8.

`xatl.serving.apply_precision(model, "int8")` turns every `nn.Linear` into an `Int8Linear` (int8
weights with one float32 scale per output row; activations float between layers, quantised per block
inside the product) and records the scheme in `model.config.quantization_config`, so that
`model.save_pretrained(out)` writes, for each such layer `L`, in model.safetensors:

- `L.weight`: int8, (out, in) — the weight is `L.weight * L.weight_scale[:, None]`;
- `L.weight_scale`: float32, one per output row (symmetric: no zero point);
- `L.bias`: float32, as it was;

and in config.json `"quantization_config": {"quant_method": "xatl", "weights": "int8", "activations": "bf16"}`,
with `tie_word_embeddings` false (the LM head has its own int8 copy; the input embedding stays float32).
`activations` says that the layers take float activations: how the kernel quantises them inside the
product is decided at run time, not by the folder.

How it multiplies: the weights are int8 with one scale per output row; the activations are
quantised on the fly to int8 in blocks of 32 values, one float32 scale per block (llama.cpp's Q8_0
for activations), by xatl's own kernel, `torch.ops.xatl.int8_linear` (`xatl.kernels`: integer dot
products with AVX512-VNNI or AVX2, built from source on first use; a decode step 1.4-1.6x faster
eagerly and 2.2-2.6x compiled than with the alternative below, bench/results/generation/compile/avx512,
on one core). Where it cannot be built (no
C++ compiler) or the input width is not a multiple of 32, the layer multiplies bfloat16 activations
by the int8 weights with `torch._weight_int8pack_mm` (the CPU kernel torchao's int8 weight-only
scheme uses), then applies the float32 scales; `use_int8_kernel(model, "torch")` asks for that one.
Both keep the saved weights as they are: the choice is made at run time, not in the folder.

Why not torch's dynamically quantised linear (int8 activations, one scale per input tensor): it
raised SmolLM2-135M's validation cross-entropy by 67% over fp32, the weights alone (dequantised) by
0.3%: one scale per tensor cannot hold activations with outliers; one per block of 32 can.

`import xatl` registers quant_method "xatl" with transformers (`register_quantization_config`,
`register_quantizer`): loading such a folder builds the model, puts an `Int8Linear` where each
`nn.Linear` was and loads the tensors as saved, so the weights are bit for bit the ones saved. It
loads pre-quantised folders only: a float folder is quantised by loading it and calling
`apply_precision`, or with `xatl quantize`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from xatl.kernels import load_kernels

QUANT_METHOD = "xatl"


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one float32 scale per output row, and float activations.

    Buffers (they save as they are): `weight` int8 (out, in), `weight_scale` float32 (out,), `bias`
    float32 (out,) or None. The output has the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # the torch kernel's own scales stay 1: the float32 ones are applied after it, unrounded
        self.register_buffer("_unit_scale", torch.ones(out_features, dtype=torch.bfloat16), persistent=False)
        self.kernel = "xatl" if load_kernels() else "torch"  # see `use_int8_kernel`

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """`linear` quantised: each row scaled so that its largest magnitude maps to 127."""
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        quantised = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls.from_int8(quantised, scale, None if linear.bias is None else linear.bias.detach())

    @classmethod
    def from_int8(cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """The layer of int8 `weight` (out, in) with one float `scale` per output row."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None).to(weight.device)
        layer.weight.copy_(weight.to(torch.int8))
        layer.weight_scale.copy_(scale.float())
        if bias is not None:
            layer.bias.copy_(bias.float())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if x.device.type == "cpu" and self.kernel == "xatl" and self.in_features % 32 == 0:
            # int8 activations in blocks of 32, integer products, scales and bias applied (one op)
            out = torch.ops.xatl.int8_linear(flat.float().contiguous(), self.weight, self.weight_scale, self.bias)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if x.device.type == "cpu" and self.in_features % 8 == 0:  # the kernel's widths (others crash it)
            activations = flat.to(torch.bfloat16).contiguous()  # the kernel reads rows contiguously
            unit = self._unit_scale.to(torch.bfloat16)  # (a model's `.float()` converts buffers too)
            out = torch._weight_int8pack_mm(activations, self.weight, unit).float()
        else:  # dequantised on the fly: slower, the same weights (float32 activations)
            out = F.linear(flat.float(), self.weight.float())
        # (N, out): scaled, plus the bias, in one op where there is one
        out = out.mul_(self.weight_scale) if self.bias is None else torch.addcmul(self.bias, out, self.weight_scale)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 weight (out, in), float32 scale per row, bias or None), as saved."""
        return self.weight, self.weight_scale, self.bias

    def dequantized(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """An `nn.Linear` holding this layer's weights, dequantised to `dtype`."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                           device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight.float() * self.weight_scale[:, None])
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")


INT8_KERNELS = ("xatl", "torch")


def use_int8_kernel(model: nn.Module, kernel: str) -> None:
    """Run every `Int8Linear` of `model` with `kernel`: "xatl" (`torch.ops.xatl.int8_linear`, int8
    activations in blocks of 32; where it was built, the default) or "torch" (`_weight_int8pack_mm`,
    bfloat16 activations). The weights are the same either way."""
    if kernel not in INT8_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(INT8_KERNELS)}, got {kernel!r}")
    if kernel == "xatl" and not load_kernels():
        raise ValueError("xatl's int8 kernel could not be built on this machine (the log says why)")
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.kernel = kernel


class XatlQuantizationConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of a model saved with int8 linear layers.

    Args:
        weights: "int8" (the one scheme: per output row, symmetric).
        activations: "bf16" (weight-only: the activations stay float, bfloat16 in the matrix product).
        modules_not_converted: names of `nn.Linear` modules kept in float (none by default).
    """

    def __init__(self, weights: str = "int8", activations: str = "bf16",
                 modules_not_converted: list[str] | None = None, **kwargs):
        if weights != "int8" or activations != "bf16":
            raise ValueError(f"xatl quantization saves int8 weights with bf16 activations, got "
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
            raise ValueError("xatl's int8 weights run on the CPU only (their kernel was measured there alone)")

    def update_dtype(self, dtype):
        return torch.float32 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        skip = set(self.quantization_config.modules_not_converted)
        replace_linears(model, lambda name, linear: None if name in skip else _Int8Slots(
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


def replace_linears(model: nn.Module, make) -> None:
    """Put `make(name, linear)` in place of each `nn.Linear`, its subclasses included (None: keep it)."""
    names = {module: name for name, module in model.named_modules()}
    linears = [(parent, name, child) for parent in list(model.modules())
               for name, child in list(parent.named_children()) if isinstance(child, nn.Linear)]
    for parent, child_name, linear in linears:
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


__all__ = ["INT8_KERNELS", "QUANT_METHOD", "Int8Linear", "XatlQuantizationConfig", "XatlQuantizer", "dequantize_int8",
           "mark_int8", "register", "replace_linears", "use_int8_kernel"]
