"""The decode step compiled at load, against eager, at each weight precision (issue 16): what it buys
per token, what it costs at load, whether the first request waits for it, and how far each step is
from the bandwidth bound of the bytes it reads.

The model is `run.py`'s `random-width512` converted to GLA (a random-weight 66M Llama: width 512, 8
layers, 32,000-token vocabulary), torch on one thread. For each precision (fp32, bf16 and int8 on
xatl's kernels; fp32-torch, bf16-torch and int8-torch: the same weights on torch's linear and
`_weight_int8pack_mm`) one engine decodes eagerly and one compiles its step (`compile="on"`:
inductor, float weights frozen, int8 ones as inputs, as the service's `auto` does where this
measured it faster: bf16, int8).

1. Load: an engine is created and a request (a 64-token prompt, 32 new tokens) is submitted at once,
   while the step compiles on its own thread: its time to first token and tokens/s, and the seconds
   until the compiled step is in use.
2. Decode: at each context every engine is prefilled with the same prompt and their decode steps are
   timed in alternating blocks (`run.interleaved_decode`); decode tokens/s = 1 / median step.
3. The bandwidth bound: bytes one step reads (weights as stored, one embedding row, the state)
   divided by the machine's copy bandwidth (read + write of 256 MB, the better of two measurements);
   `times_bound` = step time / that bound (the issue's goal: within 1.2x).

    python bench/generation/compile.py --contexts 512,2048
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import by_cpu_capability, environment, write_results  # noqa: E402
from run import (  # noqa: E402 (bench/generation)
    GREEDY,
    copy_bandwidth,
    interleaved_decode,
    random_prompt,
    random_width512,
    warm_up,
    weight_bytes_read_per_step,
)

from xatl.kernels import kernel_path, load_kernels  # noqa: E402
from xatl.quantization import use_int8_kernel  # noqa: E402
from xatl.serving import Engine, SamplingParams, apply_precision  # noqa: E402
from xatl.serving import compiled as compiling  # noqa: E402
from xatl.serving.precision import Bf16Linear, use_bf16_kernel, use_fp32_kernel  # noqa: E402

#: "int8-torch": int8 weights multiplied by torch's `_weight_int8pack_mm` (bfloat16 activations), the
#: kernel int8 layers used before xatl's own (`torch.ops.xatl.int8_linear`, "int8"); "bf16-torch":
#: bf16 weights multiplied by torch's linear instead of `torch.ops.xatl.bf16_linear` ("bf16"); "fp32-torch":
#: float32 weights by torch's linear instead of `torch.ops.xatl.f32_linear` ("fp32")
PRECISIONS = ("fp32", "fp32-torch", "bf16", "bf16-torch", "int8", "int8-torch")


def engines_for(model, tokenizer, precision: str) -> dict[str, Callable[[], Engine]]:
    """Eager and compiled, each made when called, so that a compilation starts only when its engine's
    turn comes."""
    modes = {"eager": "off", "on": "on"}
    return {f"{precision}/{mode}": functools.partial(
        Engine, at_precision(model, precision), tokenizer, background=False, compile=compile,
        precision=precision.split("-")[0], prefill_chunk=None) for mode, compile in modes.items()}


def at_precision(model, precision: str):
    """A copy of `model` for an engine of `precision` (-torch: its layers on torch's kernel)."""
    model = copy.deepcopy(model)
    if precision == "int8-torch":
        use_int8_kernel(apply_precision(model, "int8"), "torch")
    elif precision in ("bf16-torch", "fp32-torch"):
        use_kernel = use_bf16_kernel if precision == "bf16-torch" else use_fp32_kernel
        if use_kernel(apply_precision(model, precision.split("-")[0])):
            for layer in model.modules():
                if isinstance(layer, Bf16Linear):  # Fp32Linear too
                    layer.kernel = "torch"  # the engine leaves these layers as they are
    return model


def first_request(engine: Engine, vocab: int) -> dict:
    """A request submitted the moment the engine exists: its figures, and the compile's."""
    start = time.perf_counter()
    events = list(engine.submit(random_prompt(64, vocab, seed=64), SamplingParams(max_new_tokens=32, **GREEDY)))
    first_token_s = events[0].time - start
    decode_s = events[-1].time - events[0].time
    during = engine.stats().decode_step
    compiled = engine.wait_until_compiled()
    return {"first_token_s": first_token_s, "decode_tokens_per_s": (len(events) - 1) / decode_s,
            "decode_step_while_serving_it": during, "compiled": compiled,
            "compile_seconds": engine.stats().compile_seconds, "request_s": events[-1].time - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="512,2048", type=lambda t: [int(x) for x in t.split(",")])
    parser.add_argument("--precisions", default=",".join(PRECISIONS), type=lambda t: t.split(","))
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks of decode steps per context")
    parser.add_argument("--block", type=int, default=4, help="decode steps per block")
    parser.add_argument("--copy-megabytes", type=int, default=256)
    parser.add_argument("--out", default=None,
                        help="results folder under bench/results (default generation/compile/<cpu capability>)")
    parser.add_argument("--switch-interval-while-compiling", type=float, default=None,
                        help="seconds (default: the library's; Python's own is 0.005)")
    args = parser.parse_args()
    if args.switch_interval_while_compiling is not None:
        compiling.SWITCH_INTERVAL_WHILE_COMPILING_S = args.switch_interval_while_compiling
    result_switch = compiling.SWITCH_INTERVAL_WHILE_COMPILING_S
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    size = random_width512(SimpleNamespace(contexts=args.contexts, mixer="gla"))
    vocab = size.converted.config.vocab_size
    result = {"settings": dict(vars(args)), "load_average_at_start": os.getloadavg(), "load": {}, "decode": [],
              "switch_interval_while_compiling_s": result_switch}
    bandwidths = [copy_bandwidth(args.copy_megabytes)]

    # 1. load: one engine at a time, so that two compilations never overlap
    engines: dict[str, Engine] = {}
    for precision in args.precisions:
        for name, make in engines_for(size.converted, size.tokenizer, precision).items():
            engine = make()
            result["load"][name] = first_request(engine, vocab)  # reading its stream drives the engine
            print(f"{name:10s} load: {result['load'][name]}", flush=True)
            engines[name] = engine

    # 2. decode, every engine interleaved with the others
    for engine in engines.values():
        warm_up(engine, vocab)
    for context in args.contexts:
        measured = interleaved_decode(engines, random_prompt(context, vocab, seed=context), args)
        for name, row in measured.items():
            precision, mode = name.split("/")
            eager = measured[f"{precision}/eager"]["step_median_s"]
            result["decode"].append({"context": context, "precision": precision, "compile": mode,
                                     "decode_step": engines[name].stats().decode_step, **row,
                                     "speedup_over_eager": eager / row["step_median_s"],
                                     "bytes_read_per_step": weight_bytes_read_per_step(engines[name].model)
                                     + row["state_bytes"]})
        print(f"context {context:6d}: " + ", ".join(
            f"{name} {row['decode_tokens_per_s']:.1f} tok/s" for name, row in measured.items()), flush=True)

    # 3. the bandwidth bound
    bandwidths.append(copy_bandwidth(args.copy_megabytes))
    result["copy_bandwidth_bytes_per_s"] = bandwidth = max(bandwidths)
    for row in result["decode"]:
        row["bound_s"] = row["bytes_read_per_step"] / bandwidth
        row["times_bound"] = row["step_median_s"] / row["bound_s"]
    result["load_average_at_end"] = os.getloadavg()
    result["environment"] = environment()
    result["int8_kernel_path"] = kernel_path("int8") if load_kernels() else None
    result["bf16_kernel_path"] = kernel_path("bf16") if load_kernels() else None
    result["fp32_kernel_path"] = kernel_path("fp32") if load_kernels() else None
    out = args.out or by_cpu_capability("generation/compile")
    print(f"wrote {write_results(out, result, markdown(result))}")


def markdown(result: dict) -> str:
    out = ["# The decode step compiled at load, against eager (issue 16)", "",
           "random-width512 converted to GLA (random-weight 66M Llama: width 512, 8 layers, 32,000-token "
           "vocabulary), torch on one thread. `on`: the step compiled with inductor, float weights frozen, int8 ones "
           "as inputs (the service's "
           "`XATL_COMPILE=auto` does so where it measured faster). The machine is shared: "
           "ratios measured side by side, not absolute rates, are the result.", "",
           "## Load: a request submitted the moment the engine exists", "",
           f"Python's thread switch interval while a step compiles: {result['switch_interval_while_compiling_s']} s "
           "(its default: 0.005 s).", "",
           "| engine | compiled and warm after (s) | first request: first token (s) | its tokens/s "
           "| decode step while serving it |", "|---|---|---|---|---|"]
    for name, row in result["load"].items():
        seconds = "—" if row["compile_seconds"] is None else f"{row['compile_seconds']:.1f}"
        out.append(f"| {name} | {seconds} | {row['first_token_s']:.3f} | {row['decode_tokens_per_s']:.1f} "
                   f"| {row['decode_step_while_serving_it']} |")
    out += ["", "## Decode", "",
            "| context | engine | step | tokens/s | x eager | bytes read / step (MB) | bound (ms) | x bound |",
            "|---|---|---|---|---|---|---|---|"]
    for row in result["decode"]:
        out.append(f"| {row['context']:,} | {row['precision']}/{row['compile']} | {row['decode_step']} "
                   f"| {row['decode_tokens_per_s']:.1f} | {row['speedup_over_eager']:.2f}x "
                   f"| {row['bytes_read_per_step'] / 1e6:.1f} | {row['bound_s'] * 1e3:.2f} "
                   f"| {row['times_bound']:.2f}x |")
    steps = {(row["context"], row["precision"], row["compile"]): row["step_median_s"] for row in result["decode"]}
    for precision in ("int8", "bf16", "fp32"):
        kernels = [(context, mode, steps[context, f"{precision}-torch", mode] / step)
                   for (context, name, mode), step in steps.items()
                   if name == precision and (context, f"{precision}-torch", mode) in steps]
        if kernels:
            op = "f32_linear" if precision == "fp32" else f"{precision}_linear"
            out += ["", f"{precision} layers on xatl's kernel (`torch.ops.xatl.{op}`, "
                    f"{result.get(f'{precision}_kernel_path')} path) against torch's ({precision}-torch), "
                    "tokens/s ratio:", "", f"| context | step | {precision} / {precision}-torch |", "|---|---|---|"]
            out += [f"| {context:,} | {mode} | {ratio:.2f}x |" for context, mode, ratio in kernels]
    start, end = (tuple(round(x, 2) for x in result[f"load_average_at_{when}"]) for when in ("start", "end"))
    out += ["", f"Copy bandwidth (read + write of {result['settings']['copy_megabytes']} MB, the better of two "
            f"measurements): {result['copy_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s. Load average at start / end: "
            f"{start} / {end}."]
    return "\n".join(out) + "\n"

if __name__ == "__main__":
    main()
