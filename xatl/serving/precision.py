"""The precision of a model's weights in the engine: fp32, bf16 or int8, chosen per model.

- fp32: every weight in float32. The engine runs the linear layers as `Fp32Linear`: xatl's kernel
  for a decode step's few rows, torch's linear for a prefill.
- bf16: every weight (embeddings, norms and LM head included) in bfloat16; activations run in
  bfloat16 between the layers. The engine runs the linear layers as `Bf16Linear`: xatl's kernel
  (`xatl.kernels`, float32 sums) for a decode step's few rows, torch's linear for a prefill.
- int8: the weights of every `nn.Linear` (the mixers' projections, the MLPs and the LM head, which
  gets its own int8 copy when it is tied to the input embedding) quantised per output row to int8,
  symmetric (`xatl.quantization.Int8Linear`); the activations stay float32 between layers and are
  quantised to int8 in blocks of 32 inside each product by xatl's kernel (`xatl.kernels`; where it
  cannot be built, bfloat16 inside torch's `_weight_int8pack_mm`), float32 scales after it.
  The input embedding (one row read per token), the norms, the convolutions and the decay
  parameters stay in float32. CPU only (the kernels were measured there alone). Torch's dynamic int8
  linear (int8 activations, one scale per input tensor), used before, was 12% faster per token but
  raised a real model's cross-entropy by 67% (SmolLM2-135M; bench/results/saved_precision).

Recurrent state in bf16: the linear-cost mixers accumulate their state in float32 whatever the
weights' dtype (`torch.promote_types(dtype, float32)`): GLA, retention and Mamba-2 keep their
(B, H, K, V) / (B, H, N, P) state in float32, Mamba its (B, D, N) SSM state in float32. Mamba's and
Mamba-2's short convolution window holds the last few inputs in the activations' dtype (bfloat16),
as does attention's key/value cache: those are inputs kept, not sums that accumulate rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from xatl.kernels import kernel_path, load_kernels
from xatl.quantization import Int8Linear, dequantize_int8, mark_int8, replace_linears

PRECISIONS = ("fp32", "bf16", "int8")

#: the dtype a model is loaded in before `apply_precision` (int8 quantises from float32)
LOAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` with its weights in `precision`, converted in place (int8: its `nn.Linear` layers are
    replaced by `Int8Linear` ones); returns it."""
    check_precision(precision)
    if precision != "int8":
        dequantize_int8(model, LOAD_DTYPES[precision])  # a model loaded int8: its float weights back
        return model.to(LOAD_DTYPES[precision])
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 weights run on the CPU only (their kernel was measured there alone), got {device.type}")
    # (nn.Module's float: transformers refuses `.float()` on a model it loaded int8, which this leaves as is)
    nn.Module.float(model)
    replace_linears(model, lambda name, linear: Int8Linear.from_linear(linear))
    mark_int8(model)
    return model


class Bf16Linear(nn.Linear):
    """An `nn.Linear` whose bfloat16 products of a few rows on a CPU, without gradients, run xatl's
    kernel (`torch.ops.xatl.bf16_linear`, `xatl.kernels`): torch's reads a bf16 weight at a fraction
    of the memory's bandwidth for the one row of a decode step. Its parameters, state dict and every
    other case are nn.Linear's. `kernel = "torch"` asks for torch's linear."""

    kernel = "xatl"
    #: the weights' dtype this layer's kernel multiplies, and the kernel
    kernel_dtype = torch.bfloat16
    kernel_op = "bf16_linear"
    #: rows up to which xatl's kernel runs (None: any number; `use_bf16_kernel` sets it by the CPU):
    #: with AVX512-BF16 on one core it took 0.29-0.33x torch's time for one row, 0.59-0.78x for 8,
    #: 0.83-1.00x for 16 and 1.30-1.41x for 512 (bench/results/kernels/avx512); with AVX2 alone,
    #: where torch's bf16 linear has no bf16 instructions, 0.17-0.68x at every count, 512 included
    #: (bench/results/kernels/avx2)
    max_rows: int | None = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.kernel_dtype
        runs = (self.kernel == "xatl" and x.dtype == self.weight.dtype == dtype and x.device.type == "cpu"
                and self.in_features % 32 == 0 and not torch.is_grad_enabled()
                and (self.bias is None or self.bias.dtype == dtype))
        if runs and (self.max_rows is None or x.numel() <= self.max_rows * self.in_features):
            flat = x.reshape(-1, self.in_features).contiguous()  # (N, in)
            out = getattr(torch.ops.xatl, self.kernel_op)(flat, self.weight.contiguous(), self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


class Fp32Linear(Bf16Linear):
    """`Bf16Linear` for float32 weights (`torch.ops.xatl.f32_linear`): torch's float32 product of one
    row read the LM head of random-width512 at 0.52x the memory's bandwidth on an AVX2 machine,
    xatl's at 0.92x (bench/results/kernels/avx2)."""

    kernel_dtype = torch.float32
    kernel_op = "f32_linear"
    #: rows up to which xatl's kernel runs: with AVX2 on one core it took 0.35-0.93x torch's time for
    #: 1-16 rows, 1.09-1.82x for 512 (bench/results/kernels/avx2; AVX512 not measured yet)
    max_rows: int | None = 8


def use_bf16_kernel(model: nn.Module) -> bool:
    """Put a `Bf16Linear` in place of each `nn.Linear` of `model` (the same parameters: nothing is
    copied), where xatl's kernels are built; False where they are not (the model is left as it was)."""
    if not load_kernels():
        return False
    # torch's linear overtakes the kernel past a few rows only where it has AVX512-BF16 (max_rows)
    return _use_kernel(model, Bf16Linear, Bf16Linear.max_rows if kernel_path("bf16") == "avx512-bf16" else None)


def use_fp32_kernel(model: nn.Module) -> bool:
    """`use_bf16_kernel` for a float32 model: an `Fp32Linear` in place of each `nn.Linear`."""
    return load_kernels() and _use_kernel(model, Fp32Linear, Fp32Linear.max_rows)


def _use_kernel(model: nn.Module, layer_class: type[Bf16Linear], max_rows: int | None) -> bool:
    def swap(name: str, linear: nn.Linear) -> Bf16Linear | None:
        if isinstance(linear, Bf16Linear):
            return None
        layer = layer_class(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.max_rows = max_rows
        layer.weight, layer.bias = linear.weight, linear.bias  # shared (a tied LM head stays tied)
        return layer

    replace_linears(model, swap)
    return True


#: a folder's files that `save_pretrained` writes (weights, config), left behind by `save_at_precision`
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "config.json")


def save_at_precision(model_dir: str | Path, out_dir: str | Path, precision: str) -> Path:
    """Write the model of `model_dir` to `out_dir` (may be the same folder) with its weights in
    `precision`: int8 as int8 linear weights with their scales and `quantization_config` (see
    `xatl.quantization`; loads back int8), bf16 as bfloat16 tensors, fp32 as float32. The folder's
    other files (tokenizer, model card, reports) are copied as they are."""
    from xatl.loader import load_model

    check_precision(precision)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, _ = load_model(model_dir, device="cpu")
    model = apply_precision(model, precision)
    if out_dir.resolve() != model_dir.resolve():
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = {path for pattern in _WEIGHT_FILES for path in model_dir.glob(pattern)}
        for item in model_dir.iterdir():
            if item.is_file() and item not in weights:
                shutil.copy2(item, out_dir / item.name)
    else:  # the float weights go; save_pretrained writes the new ones
        for pattern in _WEIGHT_FILES[:-1]:
            for path in model_dir.glob(pattern):
                path.unlink()
    model.save_pretrained(out_dir)
    return out_dir


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters, and the int8 weights, scales and biases
    of `Int8Linear` layers (buffers)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += sum(t.numel() * t.element_size() for t in module.int8_weight() if t is not None)
    return total


def model_precision(model: nn.Module) -> str:
    """fp32, bf16 or int8, from the model's weights (another float dtype: its torch name)."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8"
    dtype = next(model.parameters()).dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))


__all__ = ["LOAD_DTYPES", "PRECISIONS", "Bf16Linear", "Fp32Linear", "apply_precision", "check_precision",
           "model_precision", "save_at_precision", "use_bf16_kernel", "use_fp32_kernel", "weight_bytes"]
