"""From finished runs to the reported numbers: speed-ups, gap closed, tables and the curves, per
mixer, and an overview of every mixer's results."""

from __future__ import annotations

import json
from pathlib import Path

GOALS = {"xatl": 4.0, "xatl+qkv": 6.0}  # speed-up goals of issue 12, every mixer
BEST_MIXER_GOAL = 8.0  # `xatl+qkv` speed-up of the best mixer
GAP_GOAL = 0.75  # share of the scratch -> donor gap the best non-hybrid variant should close
HYBRID_GAP_GOAL = 0.90  # ... and the hybrid with two attention layers


def crossing_step(curve: list[list[float]], target: float) -> float | None:
    """First step at which the validation curve reaches `target`, linearly interpolated between
    evaluations; None if it never does."""
    for (step_a, loss_a), (step_b, loss_b) in zip(curve, curve[1:]):
        if loss_a <= target:
            return step_a
        if loss_b <= target:
            return step_a + (step_b - step_a) * (loss_a - target) / (loss_a - loss_b)
    return curve[-1][0] if curve and curve[-1][1] <= target else None


def summarize(runs: dict[str, dict], donor_loss: float) -> dict[str, dict]:
    """Per variant: final loss, speed-up to scratch's final loss, gain at equal steps, gap closed."""
    scratch = runs["scratch"]
    target = scratch["final_loss"]
    scratch_steps = crossing_step(scratch["curve"], target)
    gap = target - donor_loss
    first_eval = scratch["curve"][1][0]
    summary = {}
    for name, run in runs.items():
        steps = crossing_step(run["curve"], target)
        summary[name] = {
            "lr": run["lr"],
            "transferred_lr_scale": run.get("transferred_lr_scale", 1.0),
            "final_loss": run["final_loss"],
            "steps_to_scratch_final": steps,
            # None: never reached, or reached by the transfer alone (step 0): no finite ratio
            "speedup": scratch_steps / steps if steps else None,
            # reached before the first evaluation: interpolating from step 0 (before any training)
            # says little, so only scratch_steps / first_eval is a sound (lower-bound) speed-up
            "speedup_at_least": scratch_steps / first_eval if steps is not None and steps <= first_eval else None,
            "gain_at_equal_steps_pct": 100 * (target - run["final_loss"]) / target,
            "gap_closed": (target - run["final_loss"]) / gap if gap > 0 else None,
            "tokens_per_second": run["tokens_per_second"],
            "seconds": run["seconds"],
            "unfreeze_step": run.get("unfreeze_step", 0),
        }
    return summary


def _fmt(value, pattern="{:.3f}", missing="–") -> str:
    return missing if value is None else pattern.format(value)


def markdown(results: dict) -> str:
    lines = [f"# XATL vs training from scratch: `{results['settings']['mixer']}`", ""]
    lines += [
        "Same target architecture (every attention replaced by the `{mixer}` mixer, or two layers kept as "
        "attention for the hybrid) and the same token budget for every variant; validation cross-entropy in "
        "nats/token over windows of {window} predicted tokens. Speed-up = steps from-scratch needs to reach its "
        "own final validation loss ÷ steps the variant needs to reach it (interpolated between evaluations "
        "every {eval_every} steps). Gap closed = (scratch final − variant final) ÷ (scratch final − donor)."
        .format(mixer=results["settings"]["mixer"], window=results["settings"]["eval_window"],
                eval_every=results["settings"]["eval_every"]),
        "",
    ]
    settings = results["settings"]
    lines += [
        f"tokens/s: median of each run's training throughput, with {settings['jobs']} run(s) side by side "
        f"({settings['threads_per_job'] or 'all'} thread(s) each) on a machine other work shared; compare "
        "within a table only. Wall time of this mixer's runs: "
        f"{results['wall_seconds'] / 60:.0f} min"
        + (f" ({results['reused_final_runs']} full runs reused from an earlier invocation's cache)."
           if results["reused_final_runs"] else "."),
        "",
    ]
    for donor, block in results["donors"].items():
        lines += [f"## {donor}", "", f"Donor (ceiling): **{block['donor_loss']:.4f}**; "
                  f"{block['settings_line']}", ""]
        if "donor_pretraining" in block:
            info = block["donor_pretraining"]
            config = info["config"]
            lines += [f"The donor: a transformers Llama of {info['parameters']:,} parameters "
                      f"({config['num_hidden_layers']} layers, width {config['hidden_size']}, "
                      f"{config['num_attention_heads']} heads, byte-level BPE of {config['vocab_size']} tokens "
                      f"trained on the training books), pretrained here for {info['steps']} steps "
                      f"({info['tokens']:,} tokens, {info['seconds'] / 60:.0f} min).", ""]
        lines += ["| variant | lr | step 0 | final loss | speed-up | gain at equal steps | gap closed | "
                  "copied weights released at | tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in block["summary"].items():
            step0 = block["runs"][name]["curve"][0][1]
            lines.append(
                f"| {block['labels'][name]} | {_setting(row['lr'], row['transferred_lr_scale'], name)} | "
                f"{step0:.3f} | {row['final_loss']:.4f} | "
                f"{_speedup(row)} | {row['gain_at_equal_steps_pct']:.1f}% | "
                f"{_fmt(row['gap_closed'], '{:.0%}')} | {_released(row)} | "
                f"{_fmt(row['tokens_per_second'], '{:,.0f}')} |"
            )
        if block["sweep_steps"]:
            lines += ["", "Sweep (final validation loss of a run of "
                      f"{block['sweep_steps']} steps per setting: lr × the lr scale of the weights copied from the "
                      "donor; the best setting is used for the full run):", ""]
            keys = sorted({key for sweep in block["sweeps"].values() for key in sweep},
                          key=lambda k: [-float(x) if i else float(x) for i, x in enumerate(k.split("×"))])
            lines += ["| variant | " + " | ".join(f"lr {k}" for k in keys) + " |",
                      "|---|" + "---|" * len(keys)]
            for name, sweep in block["sweeps"].items():
                cells = [_fmt(sweep.get(key), "{:.4f}") for key in keys]
                lines.append(f"| {block['labels'][name]} | " + " | ".join(cells) + " |")
        lines += ["", _goals(block), ""]
    lines += ["![validation curves](curves.png)", ""]
    return "\n".join(lines)


def _released(row: dict) -> str:
    step = row.get("unfreeze_step", 0)
    return "–" if step == 0 else ("still frozen at the end" if step is None else f"step {step}")


def _setting(lr: float, scale: float, name: str) -> str:
    return f"{lr:g}" if name == "scratch" or scale == 1 else f"{lr:g} (copied weights ×{scale:g})"


def _speedup(row: dict) -> str:
    if row["steps_to_scratch_final"] == 0:
        return "transfer alone reaches it"
    if row["speedup_at_least"] is not None:
        return f"≥{row['speedup_at_least']:.0f}x (before the first evaluation)"
    return _fmt(row["speedup"], "{:.2f}x", "not reached")


def _speedup_meets(row: dict, goal: float) -> bool:
    if row["steps_to_scratch_final"] == 0:
        return True
    value = row["speedup_at_least"] or row["speedup"]
    return value is not None and value >= goal


def _goals(block: dict) -> str:
    summary, runs = block["summary"], block["runs"]
    parts = []
    step0 = {name: run["curve"][0][1] for name, run in runs.items()}
    transferred = [n for n in GOALS if n in step0]
    if transferred:
        below = all(step0[n] < step0["scratch"] for n in transferred)
        parts.append("step 0 of " + ", ".join(f"`{n}` {step0[n]:.3f}" for n in transferred)
                     + f" against scratch's {step0['scratch']:.3f} ({'met' if below else 'NOT met'})")
    for name, goal in GOALS.items():
        if name in summary:
            status = "met" if _speedup_meets(summary[name], goal) else "NOT met"
            parts.append(f"`{name}` speed-up {_speedup(summary[name])} (goal ≥{goal:g}x: {status})")
    gaps = {n: r["gap_closed"] for n, r in summary.items()
            if r["gap_closed"] is not None and n != "scratch" and not n.startswith("hybrid")}
    if gaps:
        best = max(gaps, key=gaps.get)
        status = "met" if gaps[best] >= GAP_GOAL else "NOT met"
        parts.append(f"best non-hybrid variant `{best}` closes {gaps[best]:.0%} of the gap "
                     f"(goal ≥{GAP_GOAL:.0%}: {status})")
    hybrids = {n: r["gap_closed"] for n, r in summary.items() if n.startswith("hybrid") and r["gap_closed"] is not None}
    for name, gap in hybrids.items():
        status = "met" if gap >= HYBRID_GAP_GOAL else "NOT met"
        parts.append(f"`{name}` closes {gap:.0%} of the gap (goal ≥{HYBRID_GAP_GOAL:.0%}: {status})")
    return "Goals: " + "; ".join(parts) + "."


def write_overview(name: str) -> Path:
    """`results/<name>/README.md` from every `results/<name>/<mixer>/results.json` there: one table
    per donor with a row per mixer, so that runs of different invocations appear side by side."""
    from common import RESULTS

    folder = RESULTS / name
    mixers = {}
    for path in sorted(folder.glob("*/results.json")):
        results = json.loads(path.read_text())
        if results.get("settings", {}).get("mixer") == path.parent.name:  # a folder per mixer
            mixers[path.parent.name] = results
    lines = ["# XATL vs training from scratch, every mixer", "",
             "One row per mixer, each from its own folder (tables, sweeps, settings, machine and command there; "
             "mixers may come from different invocations, see each folder's date). Step 0: validation loss of the "
             "untrained conversion. Speed-up: steps scratch needs to reach its own final loss ÷ steps the variant "
             "needs. Gap closed: share of the scratch → donor gap closed at the end. Released: the step at which "
             "the freeze rule let the copied weights train.", ""]
    donors = sorted({d for results in mixers.values() for d in results["donors"]})
    best_speedups = []
    for donor in donors:
        rows = {m: r["donors"][donor] for m, r in mixers.items() if donor in r["donors"]}
        variants = list(dict.fromkeys(v for block in rows.values() for v in block["summary"]))
        donor_loss = next(iter(rows.values()))["donor_loss"]
        lines += [f"## {donor} (donor {donor_loss:.4f})", "",
                  "| mixer | step 0: scratch / xatl / xatl+qkv | " + " | ".join(f"`{v}`" for v in variants) + " |",
                  "|---|---|" + "---|" * len(variants),
                  ]
        for mixer, block in rows.items():
            step0 = [block["runs"][v]["curve"][0][1] for v in ("scratch", "xatl", "xatl+qkv") if v in block["runs"]]
            cells = []
            for v in variants:
                row = block["summary"].get(v)
                if row is None:
                    cells.append("–")
                    continue
                cell = f"{row['final_loss']:.3f}"
                if v != "scratch":
                    cell += f", {_speedup(row)}, {_fmt(row['gap_closed'], '{:.0%}')}"
                if row.get("unfreeze_step", 0) != 0:
                    cell += f", released: {_released(row).replace('step ', '')}"
                cells.append(cell)
            lines.append(f"| `{mixer}` | {' / '.join(f'{x:.3f}' for x in step0)} | " + " | ".join(cells) + " |")
            if "xatl+qkv" in block["summary"]:
                best_speedups.append((block["summary"]["xatl+qkv"], mixer, donor))
        lines += ["", "Cells: final validation loss, speed-up, gap closed.", ""]
    if best_speedups:
        def value(row):
            return row["speedup_at_least"] or row["speedup"] or 0.0
        row, mixer, donor = max(best_speedups, key=lambda item: value(item[0]))
        status = "met" if _speedup_meets(row, BEST_MIXER_GOAL) else "NOT met"
        lines += [f"Best `xatl+qkv` speed-up: `{mixer}` on {donor}, {_speedup(row)} "
                  f"(goal for the best mixer ≥{BEST_MIXER_GOAL:g}x: {status}).", ""]
    lines += [f"- [{m}]({m}/README.md)" for m in mixers] + [""]
    if (folder / "ANALYSIS.md").is_file():
        lines += ["Reading of these numbers: [ANALYSIS.md](ANALYSIS.md).", ""]
    (folder / "README.md").write_text("\n".join(lines))
    return folder / "README.md"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    donors = results["donors"]
    figure, axes = plt.subplots(1, len(donors), figsize=(6.5 * len(donors), 4.5), squeeze=False)
    for axis, (donor, block) in zip(axes[0], donors.items()):
        for name, run in block["runs"].items():
            steps, losses = zip(*run["curve"][1:])  # step 0 (transfer alone) is off the scale
            scale = run.get("transferred_lr_scale", 1.0)
            axis.plot(steps, losses, label=f"{block['labels'][name]} (lr {_setting(run['lr'], scale, name)})")
        axis.axhline(block["donor_loss"], color="black", linestyle="--", linewidth=1, label="donor")
        axis.set_title(f"{results['settings']['mixer']}, {donor}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("validation loss (nats/token)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    """Render each mixer's README.md and curves.png, and the overview, again from the results.json
    files (the measurement is not repeated). Argument: the results folder (default xatl_vs_scratch)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common import RESULTS, write_results

    name = sys.argv[1] if len(sys.argv) > 1 else "xatl_vs_scratch"
    for path in sorted((RESULTS / name).glob("*/results.json")):
        results = json.loads(path.read_text())
        if results.get("settings", {}).get("mixer") != path.parent.name:  # a folder per mixer only
            continue
        for block in results["donors"].values():
            block["summary"] = summarize(block["runs"], block["donor_loss"])
        plot(results, path.parent / "curves.png")
        write_results(f"{name}/{path.parent.name}", results, markdown(results))  # keeps the recorded command
    write_overview(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
