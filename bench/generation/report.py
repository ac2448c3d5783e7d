"""The generation benchmark's tables (markdown) and its context plot (PNG).

    python bench/generation/report.py bench/results/generation/results.json   # re-render the tables
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.2f} MiB"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# Generation: constant-memory decoding (converted mixer: `{s['mixer']}`, {s['dtype']})\n",
        *goals(result),
        f"torch threads: {s['threads']} (chosen: the 2-core machine is shared; load average "
        f"{result['load_average_at_start'][0]:.1f} at the start, {result['load_average_at_end'][0]:.1f} at the "
        f"end). Our engine's decode step: {'eager' if s['no_compile'] else 'compiled (torch.compile, inductor)'}. "
        f"Timings of both sides are interleaved; medians.\n",
        "Parameters: " + "; ".join(f"{name}: donor {p['donor']:,}, converted {p['converted']:,}"
                                   for name, p in result["parameters"].items()) + "\n",
        "## 1. State bytes and decode speed against the attention donor with a KV cache\n",
        "One stream, greedy; the prompt (random tokens) fills the context, then decode steps are timed. "
        "Predicted speed-up: (weights + KV cache bytes) / (weights + state bytes) read per step.\n",
        "| size | context | donor state | converted state | donor tok/s | converted tok/s | measured speed-up "
        "| predicted (bytes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["contexts"]:
        lines.append(
            f"| {row['size']} | {row['context']:,} | {_mib(row['donor_state_bytes'])} | "
            f"{_mib(row['converted_state_bytes'])} | {row['donor_decode_tokens_per_s']:.1f} | "
            f"{row['converted_decode_tokens_per_s']:.1f} | {row['measured_speedup']:.2f}x | "
            f"{row['predicted_speedup']:.2f}x |"
        )
    lines += ["", "State growth from the shortest to the longest context (ratio of bytes):\n",
              "| size | donor | converted |", "|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in result["contexts"]):
        rows = [r for r in result["contexts"] if r["size"] == size]
        first, last = rows[0], rows[-1]
        lines.append(f"| {size} ({first['context']:,} → {last['context']:,}) | "
                     f"{last['donor_state_bytes'] / first['donor_state_bytes']:.2f} | "
                     f"{last['converted_state_bytes'] / first['converted_state_bytes']:.2f} |")

    lines += ["", "## 2. Our engine against transformers' `generate()`, same converted weights, one stream\n",
              f"Prompt {s['prompt_tokens']} tokens, {s['generate_tokens']} new tokens, greedy, end to end "
              f"(prefill included; the engine also detokenises); median of {s['generate_repeats']} interleaved "
              "runs, and the best run (interference only slows a run down).\n",
              "| size | transformers generate() | " + " | ".join(
                  n.replace("_", " ") for n in result["versus_generate"][0]["speedup"]) + " | same tokens |",
              "|---|---|" + "---|" * (len(result["versus_generate"][0]["speedup"]) + 1)]
    for row in result["versus_generate"]:
        rates, best = row["tokens_per_s"], row["best_tokens_per_s"]
        cells = [f"{rates[n]:.1f} tok/s ({row['speedup'][n]:.2f}x); best {best[n]:.1f} ({row['best_speedup'][n]:.2f}x)"
                 for n in row["speedup"]]
        lines.append(f"| {row['size']} | {rates['transformers_generate']:.1f} tok/s; best "
                     f"{best['transformers_generate']:.1f} | " + " | ".join(cells) + f" | {row['same_tokens']} |")

    lines += ["", "## 3. Aggregate decode tokens/s with concurrent streams (converted model, one engine)\n",
              f"Each stream: a {s['prompt_tokens']}-token prompt; after all streams are admitted and "
              f"{s['warmup_steps']} more steps, {s['concurrent_steps']} decode steps are timed. Rounds over the "
              f"stream counts ({s['rounds']}), median (and best) per count.\n",
              "| size | streams | decode tok/s | vs one stream | best round |", "|---|---|---|---|---|"]
    for row in result["concurrency"]:
        lines.append(f"| {row['size']} | {row['streams']} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['speedup_over_one_stream']:.2f}x | {row['best_decode_tokens_per_s']:.1f} |")

    bandwidth = max(result["copy_bandwidth_bytes_per_s"], result["copy_bandwidth_bytes_per_s_at_end"])
    lines += ["", "## 4. Decode step time against the memory-bandwidth bound\n",
              f"Copy bandwidth (read + write, {s['copy_megabytes']} MiB tensors, best of the measurements at the "
              f"start and end): {bandwidth / 1e9:.2f} GB/s. Bound = bytes read per step / that bandwidth.\n",
              "| size | model | context | bytes read per step | bound | measured step | times the bound |",
              "|---|---|---|---|---|---|---|"]
    for row in result["bandwidth"]:
        lines.append(f"| {row['size']} | {row['model']} | {row['context']:,} | {_mib(row['bytes_read_per_step'])} | "
                     f"{row['bound_s'] * 1000:.2f} ms | {row['step_s'] * 1000:.2f} ms | {row['times_bound']:.2f} |")
    return "\n".join(lines)


def precision_markdown(result: dict) -> str:
    """Tables of the `--precisions` run: decode speed per precision, cross-entropy against fp32."""
    s = result["settings"]
    first = s["precisions"][0]
    lines = [
        f"# Generation: weights in {', '.join(s['precisions'])} (converted mixer: `{s['mixer']}`)\n",
        f"torch threads: {s['threads']}; load average {result['load_average_at_start'][0]:.1f} at the start, "
        f"{result['load_average_at_end'][0]:.1f} at the end (2 cores, shared). Decode step eager. One stream, "
        "greedy; the prompt (random tokens) fills the context; the precisions' decode steps interleaved "
        "in blocks, medians. int8: every linear layer's weights int8 (LM head included), activations float; bf16: "
        "every weight (see `xatl/serving/precision.py`).\n",
        "## Decode speed\n",
        f"| size | context | precision | weights | state | tok/s | vs {first} |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["speed"]:
        lines.append(f"| {row['size']} | {row['context']:,} | {row['precision']} | {_mib(row['weight_bytes'])} | "
                     f"{_mib(row['state_bytes'])} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row[f'speedup_over_{first}']:.2f}x |")
    if result["quality"]:
        row = result["quality"][0]
        lines += [
            "\n## Validation cross-entropy\n",
            f"TinyStories validation (`../shared/data/tinystories_val_subset`), {row['tokens']:,} predicted tokens "
            f"in blocks of {s['eval_block']}, the same for every precision, two ways: the parallel forward over "
            "whole blocks (int8 activations are then quantised per tensor, a block at a time) and decode steps, "
            "one token at a time through the recurrent state, as the engine serves one stream (int8 activations "
            "quantised per token). The donor is stories260K as trained; the converted model is its GLA "
            "conversion *untrained* (weights transferred, no training): its loss is high, but the precisions "
            "are compared on the same weights. Goal: within 0.5% (bf16) and 1.5% (int8) of fp32.\n",
            "| size | model | precision | parallel CE (nats/token) | vs fp32 | decode CE | vs fp32 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in result["quality"]:
            relative = {form: "" if f"{form}_relative_to_fp32" not in row
                        else f"{100 * row[f'{form}_relative_to_fp32']:+.2f}%" for form in ("parallel", "decode")}
            lines.append(f"| {row['size']} | {row['model']} | {row['precision']} | "
                         f"{row['parallel_cross_entropy']:.4f} | {relative['parallel']} | "
                         f"{row['decode_cross_entropy']:.4f} | {relative['decode']} |")
    return "\n".join(lines) + "\n"


def goals(result: dict) -> list[str]:
    """The issue's goals against what was measured, for the sizes this run has."""
    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = ["| goal | measured | |", "|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in result["contexts"]):
        rows = [r for r in result["contexts"] if r["size"] == size]
        growth = rows[-1]["converted_state_bytes"] / rows[0]["converted_state_bytes"]
        lines.append(f"| {size}: state flat ({rows[-1]['context']:,} / {rows[0]['context']:,} = 1.00) | "
                     f"{growth:.2f} (donor {rows[-1]['donor_state_bytes'] / rows[0]['donor_state_bytes']:.2f}) | "
                     f"{met(growth == 1.0)} |")
        last = rows[-1]
        lines.append(f"| {size}: decode at {last['context']:,} ≥ 3x the donor | {last['measured_speedup']:.2f}x "
                     f"(bytes predict {last['predicted_speedup']:.2f}x) | {met(last['measured_speedup'] >= 3)} |")
    for row in result["versus_generate"]:
        best_engine = max(row["speedup"], key=row["speedup"].get)
        speedup = row["speedup"][best_engine]
        lines.append(f"| {row['size']}: engine ≥ 3x transformers' generate(), one stream | {speedup:.2f}x "
                     f"({best_engine.replace('_', ' ')}; best runs {row['best_speedup'][best_engine]:.2f}x) | "
                     f"{met(speedup >= 3)} |")
    for row in result["concurrency"]:
        if row["streams"] == 16:
            lines.append(f"| {row['size']}: 16 streams ≥ 8x one stream | {row['speedup_over_one_stream']:.2f}x | "
                         f"{met(row['speedup_over_one_stream'] >= 8)} |")
    smallest = min(r["context"] for r in result["bandwidth"])
    for row in result["bandwidth"]:
        if row["model"] == "converted" and row["context"] == smallest and row["size"] != "stories260K":
            lines.append(f"| {row['size']}: decode step within 2x of the bandwidth bound | "
                         f"{row['times_bound']:.2f}x the bound | {met(row['times_bound'] <= 2)} |")
    return [*lines, ""]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in result["contexts"]))
    figure, axes = plt.subplots(len(sizes), 2, figsize=(10, 3.6 * len(sizes)), squeeze=False)
    for (state_axis, speed_axis), size in zip(axes, sizes):
        rows = [r for r in result["contexts"] if r["size"] == size]
        contexts = [r["context"] for r in rows]
        for role, style in (("donor", "o-"), ("converted", "s-")):
            label = "attention donor (KV cache)" if role == "donor" else f"converted ({result['settings']['mixer']})"
            state_axis.plot(contexts, [r[f"{role}_state_bytes"] / 2**20 for r in rows], style, label=label)
            speed_axis.plot(contexts, [r[f"{role}_decode_tokens_per_s"] for r in rows], style, label=label)
        state_axis.set(title=f"{size}: state per stream", xlabel="context (tokens)", ylabel="MiB", xscale="log")
        speed_axis.set(title=f"{size}: decode speed, one stream", xlabel="context (tokens)", ylabel="tokens/s",
                       xscale="log")
        state_axis.legend()
        speed_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common import RESULTS, write_results

    path = Path(sys.argv[1]).resolve()
    payload = json.loads(path.read_text())
    folder = write_results(str(path.parent.relative_to(RESULTS)), payload, markdown(payload))
    plot(payload, folder / "contexts.png")
