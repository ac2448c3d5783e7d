"""xatl's CPU kernels against torch's, one matrix product at a time (issue 16): median microseconds
for weights of random-width512's shapes (its projections, MLP and LM head) and a few activation
rows (a decode step's batch) or 512 (a prefill chunk), one thread, the kernels' calls interleaved.

- int8: `torch.ops.xatl.int8_linear` (float32 activations quantised in blocks of 32, scales and no
  bias applied) against `torch._weight_int8pack_mm` as `Int8Linear` runs it (bfloat16 activations,
  float32 scales after);
- bf16: `torch.ops.xatl.bf16_linear` against `torch.nn.functional.linear` on bfloat16 tensors;
- fp32: `torch.ops.xatl.f32_linear` against `torch.nn.functional.linear` on float32 tensors.

The bound: the weight's bytes over the machine's copy bandwidth (read + write of 256 MB); weights of
512 x 512 fit in the cache, so a loop over one of them can beat it.

    python bench/kernels/run.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
from common import by_cpu_capability, environment, write_results  # noqa: E402
from run import copy_bandwidth  # noqa: E402 (bench/generation)

from xatl.kernels import kernel_path, load_kernels  # noqa: E402

SHAPES = [(512, 512), (2048, 512), (512, 2048), (32000, 512)]  # (out, in): q/k/v/o, MLP up, MLP down, LM head
ROWS = [1, 4, 8, 16, 512]


def medians(calls: dict, repeats: int) -> dict:
    """Median seconds of each call, the calls interleaved (a busy machine slows them alike)."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def products(x, int8, scale, unit, bf16, fp32) -> dict:
    """The six products of activations `x` (N, K) with the (O, K) weights, by name."""
    xb = x.bfloat16()
    return {
        "int8_torch": lambda: torch._weight_int8pack_mm(x.bfloat16(), int8, unit).float().mul_(scale),
        "int8_xatl": lambda: torch.ops.xatl.int8_linear(x, int8, scale, None),
        "bf16_torch": lambda: torch.nn.functional.linear(xb, bf16),
        "bf16_xatl": lambda: torch.ops.xatl.bf16_linear(xb, bf16, None),
        "fp32_torch": lambda: torch.nn.functional.linear(x, fp32),
        "fp32_xatl": lambda: torch.ops.xatl.f32_linear(x, fp32, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=100, help="calls of each (a fifth for 512 rows)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not load_kernels():
        raise SystemExit("xatl's kernels could not be built here (see the log)")
    bandwidth = copy_bandwidth(256)
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for out_features, in_features in SHAPES:
        int8 = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
        scale, unit = torch.rand(out_features, generator=generator), torch.ones(out_features, dtype=torch.bfloat16)
        fp32 = torch.randn(out_features, in_features, generator=generator)
        bf16 = fp32.bfloat16()
        for rows in ROWS:
            x = torch.randn(rows, in_features, generator=generator)
            repeats = args.repeats if rows < 512 else max(3, args.repeats // 5)
            got = medians(products(x, int8, scale, unit, bf16, fp32), repeats)
            rows_out.append({"out": out_features, "in": in_features, "rows": rows,
                             **{f"{name}_s": seconds for name, seconds in got.items()},
                             "int8_bound_s": out_features * in_features / bandwidth,
                             "bf16_bound_s": 2 * out_features * in_features / bandwidth,
                             "fp32_bound_s": 4 * out_features * in_features / bandwidth})
            print(rows_out[-1], flush=True)
    result = {"copy_bandwidth_bytes_per_s": bandwidth, "paths": {p: kernel_path(p) for p in ("int8", "bf16", "fp32")},
              "rows": rows_out, "settings": vars(args), "environment": environment()}
    print(f"wrote {write_results(by_cpu_capability('kernels'), result, markdown(result))}")


def markdown(result: dict) -> str:
    paths = result["paths"]
    out = ["# xatl's CPU kernels against torch's, one product (issue 16)", "",
           f"One thread; median µs of interleaved calls; xatl's paths here: int8 {paths['int8']}, bf16 "
           f"{paths['bf16']}, fp32 {paths.get('fp32', '-')}. Bound: the weight's bytes over the copy bandwidth "
           f"({result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s); 512 x 512 weights stay in the cache.", ""]
    precisions = [p for p in ("int8", "bf16", "fp32") if f"{p}_xatl_s" in result["rows"][0]]
    out.append("| weight (out x in) | rows | " + " | ".join(
        f"{p}: torch | {p}: xatl | torch / xatl | {p} bound" for p in precisions) + " |")
    out.append("|---|---|" + "---|---|---|---|" * len(precisions))
    for r in result["rows"]:
        cells = [f"{r[f'{p}_torch_s'] * 1e6:.1f} | {r[f'{p}_xatl_s'] * 1e6:.1f} | "
                 f"{r[f'{p}_torch_s'] / r[f'{p}_xatl_s']:.2f}x | {r[f'{p}_bound_s'] * 1e6:.1f}" for p in precisions]
        out.append(f"| {r['out']} x {r['in']} | {r['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
