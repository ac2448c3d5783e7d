"""Training throughput and decode state size of every mixer, side by side in one run.

For each sequence length: training tokens/s (forward + backward, same tokens per step) of a model
with each mixer in every layer, of the all-attention skeleton of the same size, and of
transformers' Mamba / Mamba-2 (their pure-PyTorch paths, as on a machine without the CUDA
kernels); and the bytes of decode state after a prompt of that length. Timings are interleaved
round-robin over the models and the median is kept, since this machine is shared and noisy.

    python bench/mixers/run.py                      # defaults: lengths 256,1024,2048,4096
    python bench/mixers/run.py --lengths 256 --repeats 1   # a quick look
    python bench/mixers/run.py --device cuda --precision bf16 --name mixers/cuda   # on a GPU

On CUDA with mamba_ssm / causal-conv1d installed, the Mamba mixers (and transformers' Mamba models)
run the kernels, and `mamba (pytorch)` / `mamba2 (pytorch)` are the same models on the PyTorch path.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, write_results  # noqa: E402

import xatl  # noqa: E402
from xatl.mixers import MIXERS  # noqa: E402


def skeleton(args, mixer: str) -> xatl.XatlConfig:
    return xatl.XatlConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        max_position_embeddings=max(args.lengths), layer_mixers=[mixer] * args.layers,
    )


def build_models(args) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models = {name: xatl.XatlForCausalLM(skeleton(args, name)) for name in MIXERS}
    if args.device == "cuda":  # the kernels' reference beside them
        for name in ("mamba", "mamba2"):
            model = xatl.XatlForCausalLM(skeleton(args, name))
            for module in model.modules():
                if hasattr(module, "use_kernels"):
                    module.use_kernels = False
            models[f"{name} (pytorch)"] = model
    models["hf-mamba"] = MambaForCausalLM(MambaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        state_size=16, expand=2, use_cache=False))
    models["hf-mamba2"] = Mamba2ForCausalLM(Mamba2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_heads=2 * args.hidden // 64, head_dim=64, state_size=64, n_groups=1, expand=2,
        chunk_size=64, use_cache=False))
    return {name: model.to(args.device) for name, model in models.items()}


def train_step(model, ids, precision: str) -> None:
    model.zero_grad(set_to_none=True)
    autocast = (torch.autocast(ids.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if ids.is_cuda:
        torch.cuda.synchronize()


def state_bytes(model, length: int, vocab: int) -> int:
    """Bytes of decode state held after a prompt of `length` tokens (batch 1)."""
    ids = torch.randint(0, vocab, (1, length), device=next(model.parameters()).device)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    if isinstance(cache, xatl.XatlCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for t in _tensors(cache))


def _tensors(obj, seen=None):
    """Every tensor reachable from a transformers cache object (its layout varies by version)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, seen)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value, seen)
    elif hasattr(obj, "__dict__"):
        yield from _tensors(vars(obj), seen)


def measure(args) -> dict:
    models = build_models(args)
    rows = []
    for length in args.lengths:
        batch = max(1, args.tokens_per_step // length)
        ids = torch.randint(0, args.vocab, (batch, length), device=args.device)
        # transformers' Mamba slow path loops over tokens in Python: a single small step is all it gets
        slow_ids = ids[: max(1, args.slow_tokens // length)]
        names = [n for n in models if n != "hf-mamba" or length <= args.slow_max_length]
        timings = {name: [] for name in names}
        for name in names:  # warm-up (allocator, first-call overheads)
            train_step(models[name], slow_ids if name == "hf-mamba" else ids, args.precision)
        for _ in range(args.repeats):
            for name in names:
                if name == "hf-mamba" and timings[name] and args.device == "cpu":
                    continue  # one measured step of the slow path is enough (and all it can afford)
                step_ids = slow_ids if name == "hf-mamba" else ids
                start = time.perf_counter()
                train_step(models[name], step_ids, args.precision)
                timings[name].append(step_ids.numel() / (time.perf_counter() - start))
        for name in names:
            row = {"length": length, "model": name, "tokens_per_step": int(ids.numel()),
                   "train_tokens_per_s": statistics.median(timings[name]),
                   "state_bytes": state_bytes(models[name], length, args.vocab)}
            rows.append(row)
            print(f"L={length:5d} {name:10s} {row['train_tokens_per_s']:10.0f} tok/s  "
                  f"state {row['state_bytes']:>12,d} B", flush=True)
    return {"settings": vars(args), "rows": rows}


def markdown(result: dict) -> str:
    rows = result["rows"]
    by = {(r["length"], r["model"]): r for r in rows}
    lengths = sorted({r["length"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    s = result["settings"]
    lines = [
        f"# Mixers: training throughput and decode state ({s['layers']} layers, width {s['hidden']}, "
        f"{s['heads']} heads, ~{s['tokens_per_step']} tokens per step, {s.get('device', 'cpu')}, "
        f"{s.get('precision', 'fp32')})\n",
        f"CUDA kernels: {result['environment'].get('kernels')}\n" if s.get("device") == "cuda" else "",
        "Training tokens/s (forward + backward), median of interleaved repeats; in brackets the ratio "
        "to attention at the same length, and for the linear mixers to transformers' Mamba slow path "
        "where it was measured.\n",
        "| model | " + " | ".join(f"L={n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    slow = {n: by[(n, "hf-mamba")]["train_tokens_per_s"] for n in lengths if (n, "hf-mamba") in by}
    for model in models:
        cells = []
        for n in lengths:
            r = by.get((n, model))
            if r is None:
                cells.append("–")
                continue
            tps = r["train_tokens_per_s"]
            cell = f"{tps:,.0f} ({tps / by[(n, 'attention')]['train_tokens_per_s']:.2f}x attn"
            if n in slow and model != "hf-mamba":
                cell += f", {tps / slow[n]:.0f}x hf-mamba"
            cells.append(cell + ")")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"Decode state after a prompt of L tokens, batch 1 (bytes; ratio to L={lengths[0]})\n",
              "| model | " + " | ".join(f"L={n}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for model in models:
        first = by.get((lengths[0], model))
        cells = [
            f"{by[(n, model)]['state_bytes']:,} ({by[(n, model)]['state_bytes'] / first['state_bytes']:.2f})"
            if (n, model) in by and first else "–"
            for n in lengths
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernel_versions() -> dict[str, str | None]:
    """The CUDA kernel packages the Mamba mixers found (None: not installed, PyTorch path)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("mamba_ssm", "causal_conv1d"):
        try:
            module = __import__(package)
            found[package] = getattr(module, "__version__", None) or version(package)
        except (ImportError, PackageNotFoundError):
            found[package] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,1024,2048,4096", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slow-tokens", type=int, default=512, help="tokens per step for hf-mamba's slow path")
    parser.add_argument("--slow-max-length", type=int, default=256, help="longest length hf-mamba is run at")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    parser.add_argument("--name", default="mixers", help="results folder under bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as any CPU training run should; the mixers avoid denormals anyway
    result = measure(args)
    result["environment"] = environment()
    result["environment"]["kernels"] = kernel_versions()
    folder = write_results(args.name, result, markdown(result))
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
