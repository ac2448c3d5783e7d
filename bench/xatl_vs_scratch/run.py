"""XATL vs from-scratch, side by side, for each linear-cost mixer: the reproduction of the project's claim.

For each mixer, each donor (stories260K on TinyStories; a Llama pretrained here on Gutenberg books)
and each variant, the same target architecture is trained for the same number of tokens:

    scratch          every weight random (transfer `none`)
    xatl             embeddings, norms, MLPs, head and W_O from the donor
    xatl+qkv         + the mixers' input projections from the donor's Q/K/V
    xatl+qkv+lit     `xatl+qkv` with the weights copied from the donor frozen until the training loss
                     stops improving (`--freeze lit`: the seed paper's rule)
    xatl+qkv+steps   `xatl+qkv` with them frozen for a fixed number of steps (`--freeze steps:N`)
    hybrid           `xatl+qkv` with attention kept at two layers
    xatl+kl          `xatl`, trained with logit distillation from the donor (not run by default)
    hybrid+kl        `hybrid`, trained with logit distillation from the donor (not run by default)

Each variant's learning rate, and for the transferred variants the scale of the learning rate of
the weights copied from the donor, come from a short sweep over a grid that this command runs (and
reports); the full runs then record validation curves. Results go to
bench/results/xatl_vs_scratch/<mixer>/ (results.json, README.md with tables, goals, settings and
machine, and curves.png), one folder per mixer, written as soon as that mixer is done; then
bench/results/xatl_vs_scratch/README.md is rewritten from every mixer folder there, so a long run
can be split over several invocations (`--mixers mamba2`, then `--mixers mamba`, ...). Finished runs
are cached under bench/.cache/xatl_vs_scratch/ and reused when their settings match, so an
interrupted run continues.

    .venv/bin/python bench/xatl_vs_scratch/run.py --jobs 1 --threads 1       # every mixer, stories260K
    .venv/bin/python bench/xatl_vs_scratch/run.py --mixers gla --donors stories260K gutenberg \
        --variants scratch xatl xatl+qkv xatl+kl hybrid hybrid+kl          # the earlier GLA comparison
    .venv/bin/python bench/xatl_vs_scratch/run.py --scale gpu     # longer runs, a bigger donor, on CUDA
    .venv/bin/python bench/xatl_vs_scratch/run.py --mixers gla --steps 100 --lrs 3e-3 \
        --name xatl_vs_scratch/quick                               # a quick look
    .venv/bin/python bench/xatl_vs_scratch/run.py --mixers retention --steps 150 --batch-size 8 \
        --eval-every 15 --lrs 3e-3 --jobs 1 --threads 1       # one mixer, sized for a shared 2-core machine
    .venv/bin/python bench/xatl_vs_scratch/report.py               # render the READMEs / curves again
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import environment, write_results  # noqa: E402
from report import markdown, plot, summarize, write_overview  # noqa: E402
from tasks import CACHE, ROOT, Task, gutenberg_task, relative, stories_task  # noqa: E402

MIXERS = ["mamba2", "mamba", "retention", "gla"]
VARIANTS = {
    "scratch": {"transfer": "none", "label": "scratch"},
    "xatl": {"transfer": "xatl", "label": "xatl"},
    "xatl+qkv": {"transfer": "xatl+qkv", "label": "xatl+qkv"},
    "xatl+qkv+lit": {"transfer": "xatl+qkv", "freeze": "lit", "label": "xatl+qkv, frozen until the loss stalls (lit)"},
    "xatl+qkv+steps": {"transfer": "xatl+qkv", "freeze": "steps:{freeze_steps}",
                       "label": "xatl+qkv, frozen for {freeze_steps} steps"},
    "hybrid": {"transfer": "xatl+qkv", "hybrid": True, "label": "hybrid (xatl+qkv, attention at {layers})"},
    "xatl+kl": {"transfer": "xatl", "distill": "kl", "label": "xatl + logit KL"},
    "hybrid+kl": {"transfer": "xatl+qkv", "hybrid": True, "distill": "kl", "label": "hybrid + logit KL"},
}
DEFAULT_VARIANTS = ["scratch", "xatl", "xatl+qkv", "xatl+qkv+lit", "xatl+qkv+steps", "hybrid"]

SCALES = {
    "cpu": {
        "stories260K": dict(block_size=256, eval_window=256, valid_stories=400, batch_size=16, steps=400,
                            eval_every=25, warmup_steps=30),
        "gutenberg": dict(block_size=256, eval_window=256, valid_windows=64, batch_size=8, steps=250,
                          eval_every=25, warmup_steps=30,
                          donor=dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                     num_attention_heads=4, steps=1200, batch_size=8, lr=3e-3, warmup_steps=50)),
        "lrs": [1e-3, 3e-3], "transferred_lr_scales": [1.0], "sweep_fraction": 1 / 5, "jobs": 2,
        "threads": 1, "device": "cpu",
    },
    "gpu": {
        "stories260K": dict(block_size=256, eval_window=256, valid_stories=400, batch_size=16, steps=800,
                            eval_every=25, warmup_steps=30),
        "gutenberg": dict(block_size=512, eval_window=512, valid_windows=256, batch_size=16, steps=1500,
                          eval_every=50, warmup_steps=50,
                          donor=dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                     num_attention_heads=8, steps=6000, batch_size=32, lr=2e-3, warmup_steps=200)),
        "lrs": [1e-3, 2e-3, 3e-3, 6e-3], "transferred_lr_scales": [1.0, 0.3], "sweep_fraction": 1 / 4, "jobs": 1,
        "threads": 0, "device": "cuda",
    },
}
COMMON = dict(kl_weight=0.5, temperature=1.0, weight_decay=0.1, min_lr_ratio=0.1, seed=0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sweep_grid(variant: str, lrs: list[float], scales: list[float]) -> list[tuple[float, float]]:
    """(lr, lr scale of the transferred weights) pairs a variant is swept over; scratch has no
    transferred weights, so only its lr varies."""
    return [(lr, 1.0) for lr in lrs] if variant == "scratch" else [(lr, sc) for lr in lrs for sc in scales]


def setting_key(lr: float, scale: float) -> str:
    return f"{lr:g}×{scale:g}"


def hybrid_layers(num_layers: int) -> list[int]:
    """Two attention layers, a quarter and three quarters of the way up (5 layers: 1 and 3)."""
    return [num_layers // 4, (3 * num_layers) // 4]


# -- one training run (in a worker process) -------------------------------------------------------

def run_one(spec: dict) -> dict:
    """Convert the donor as `spec` says, train it, record its validation curve. Cached by spec.

    Through `xatl.pipeline.run_pipeline`, the code path of `xatl train`'s set-up and of the workers'
    jobs: a first call converts (in `folder/converted`), the step-0 loss is measured on it, a second
    call trains it (the conversion is found and reused) on the task's pre-tokenised blocks."""
    import torch
    from transformers.utils import logging as transformers_logging

    from xatl.eval import evaluate_loss
    from xatl.loader import load_model
    from xatl.pipeline import ConvertStage, PipelineSpec, TrainStage, run_pipeline
    from xatl.training import TrainConfig

    transformers_logging.disable_progress_bar()
    folder = ROOT / spec["folder"]
    result_file = folder / "result.json"
    if result_file.is_file():
        cached = json.loads(result_file.read_text())
        if cached["spec"] == spec:
            return {**cached, "reused": True}
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    task = Task(**spec["task"])
    variant = VARIANTS[spec["variant"]]
    layers = hybrid_layers(task.num_layers) if variant.get("hybrid") else []
    convert = ConvertStage(donor=task.donor_source, tokenizer=task.donor_tokenizer, mixer=spec["mixer"],
                           attention_layers=layers, transfer=variant["transfer"], seed=spec["seed"])
    config = TrainConfig(
        max_steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"], warmup_steps=spec["warmup_steps"],
        min_lr_ratio=spec["min_lr_ratio"], weight_decay=spec["weight_decay"], distill=variant.get("distill", ""),
        freeze=spec["freeze"], transferred_lr_scale=spec["transferred_lr_scale"],
        kl_weight=spec["kl_weight"], temperature=spec["temperature"], seed=spec["seed"],
        eval_every=spec["eval_every"], log_every=10,
    )
    train_blocks, valid = task.blocks("train"), task.blocks("valid")
    curve, speeds, unfrozen = [], [], []

    def on_event(event: dict) -> None:
        if event["event"] == "eval":
            curve.append([event["step"], event["valid_loss"]])
        elif event["event"] == "train" and event["tokens_per_second"]:
            speeds.append(event["tokens_per_second"])
        elif event["event"] == "unfreeze":
            unfrozen.append(event["step"])

    run_pipeline(PipelineSpec(convert=convert, device=spec["device"]), folder)  # 1. convert
    if spec["eval_every"]:  # 2. the step-0 point of the curve
        model, _ = load_model(folder / "converted", device=spec["device"], dtype=torch.float32)
        curve.append([0, evaluate_loss(model, valid, batch_size=16).loss])
        del model
    start = time.perf_counter()  # 3. train, with the donor as teacher when the variant distils
    result = run_pipeline(PipelineSpec(convert=convert, train=TrainStage(config=config), device=spec["device"]),
                          folder, blocks=train_blocks, valid_blocks=valid, on_event=on_event).train
    outcome = {
        "spec": spec, "lr": spec["lr"], "transferred_lr_scale": spec["transferred_lr_scale"],
        "curve": curve, "final_loss": result["valid_loss"], "freeze": spec["freeze"],
        # the step the frozen weights were released at; None: still frozen at the end
        "unfreeze_step": (unfrozen[0] if unfrozen else None) if spec["freeze"] != "none" else 0,
        "tokens": result["tokens"], "seconds": time.perf_counter() - start,
        "tokens_per_second": statistics.median(speeds) if speeds else None,
    }
    result_file.write_text(json.dumps(outcome, indent=1) + "\n")
    log(f"{spec['name']}: validation {result['valid_loss']:.4f} after {result['steps']} steps "
        f"({outcome['seconds']:.0f} s, {outcome['tokens_per_second'] or 0:,.0f} tokens/s)")
    return outcome


def prepare_gutenberg(data_dir: str, settings: dict) -> Task:
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    return gutenberg_task(Path(data_dir), settings, log)


# -- the whole comparison ---------------------------------------------------------------------------

def make_spec(task: Task, donor_settings: dict, args, mixer: str, variant: str, lr: float, scale: float,
              steps: int, sweep: bool) -> dict:
    kind = "sweep" if sweep else "final"
    name = f"{mixer}/{task.name}/{variant}/{kind}-lr{lr:g}-x{scale:g}"
    freeze = VARIANTS[variant].get("freeze", "none").format(freeze_steps=donor_settings["freeze_steps"])
    folder = CACHE / "runs" / Path(task.folder).name / mixer / variant / f"{kind}-lr{lr:g}-x{scale:g}-{steps}"
    return {
        "name": name, "folder": relative(folder), "task": asdict(task), "mixer": mixer, "variant": variant,
        "freeze": freeze, "lr": lr, "transferred_lr_scale": scale, "steps": steps,
        "batch_size": donor_settings["batch_size"], "warmup_steps": min(donor_settings["warmup_steps"], steps // 4),
        "eval_every": 0 if sweep else donor_settings["eval_every"], "device": args.device,
        "threads": args.threads, **COMMON, "kl_weight": args.kl_weight,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = copy.deepcopy(SCALES[args.scale])
    data_dir = Path(args.data_dir)
    jobs = args.jobs or scale["jobs"]
    log(f"scale {args.scale}: mixers {args.mixers}, donors {args.donors}, variants {args.variants}, lrs {args.lrs}, "
        f"transferred-lr scales {args.transferred_lr_scales}, {jobs} job(s) of {args.threads or 'all'} thread(s)")
    settings = {}
    for donor in args.donors:
        settings[donor] = scale[donor]
        for key in ("steps", "batch_size", "eval_every"):  # the command line's overrides of the scale
            if getattr(args, key):
                settings[donor][key] = getattr(args, key)
        if args.donor_steps and "donor" in settings[donor]:
            settings[donor]["donor"]["steps"] = args.donor_steps
        settings[donor]["freeze_steps"] = args.freeze_steps or max(1, settings[donor]["steps"] // 8)
        settings[donor] |= {"seed": COMMON["seed"], "device": args.device, "threads": args.threads}

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        tasks: dict[str, Task] = {}
        if "gutenberg" in args.donors:  # pretrains the donor the first time (cached)
            gutenberg = pool.submit(prepare_gutenberg, str(data_dir), settings["gutenberg"])
        if "stories260K" in args.donors:
            tasks["stories260K"] = stories_task(data_dir, settings["stories260K"], log)
        if "gutenberg" in args.donors:
            tasks["gutenberg"] = gutenberg.result()
        for mixer in args.mixers:
            started = time.perf_counter()
            sweeps, finals = run_mixer(pool, mixer, tasks, settings, args, scale)
            results = collect(mixer, tasks, settings, args, scale, jobs, sweeps, finals)
            results["wall_seconds"] = time.perf_counter() - started
            results["environment"] = environment()
            folder = write_results(f"{args.name}/{mixer}", results, markdown(results))
            plot(results, folder / "curves.png")
            write_overview(args.name)
            log(f"{mixer}: done in {results['wall_seconds'] / 60:.1f} min: {relative(folder)}")
    return 0


def run_mixer(pool, mixer: str, tasks: dict[str, Task], settings: dict, args, scale: dict):
    """The sweeps, then the full run of each variant at its best setting; returns both."""
    sweeps: dict[str, dict[str, dict]] = {d: {v: {} for v in args.variants} for d in args.donors}
    finals: dict[str, dict[str, dict]] = {d: {} for d in args.donors}
    pending = {}

    def submit_final(donor: str, variant: str) -> None:
        results = sweeps[donor][variant]
        best = min(results, key=lambda key: results[key] if results[key] is not None else 0.0)
        lr, lr_scale = (float(x) for x in best.split("×"))
        spec = make_spec(tasks[donor], settings[donor], args, mixer, variant, lr, lr_scale,
                         settings[donor]["steps"], sweep=False)
        pending[pool.submit(run_one, spec)] = ("final", donor, variant, (lr, lr_scale))

    for donor in args.donors:
        task, block = tasks[donor], settings[donor]
        sweep_steps = max(1, round(block["steps"] * scale["sweep_fraction"]))
        for variant in args.variants:
            grid = sweep_grid(variant, args.lrs, args.transferred_lr_scales)
            if len(grid) == 1:
                sweeps[donor][variant] = {setting_key(*grid[0]): None}
                submit_final(donor, variant)
                continue
            for lr, lr_scale in grid:
                spec = make_spec(task, block, args, mixer, variant, lr, lr_scale, sweep_steps, sweep=True)
                pending[pool.submit(run_one, spec)] = ("sweep", donor, variant, (lr, lr_scale))
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            kind, donor, variant, setting = pending.pop(future)
            outcome = future.result()
            if kind == "sweep":
                sweeps[donor][variant][setting_key(*setting)] = outcome["final_loss"]
                if len(sweeps[donor][variant]) == len(sweep_grid(variant, args.lrs, args.transferred_lr_scales)):
                    submit_final(donor, variant)
            else:
                finals[donor][variant] = outcome
    return sweeps, finals


def collect(mixer, tasks, settings, args, scale, jobs, sweeps, finals) -> dict:
    """One mixer's results.json: settings, and per donor its runs, sweeps and summary."""
    reused = sum(run.get("reused", False) for block in finals.values() for run in block.values())
    results = {"reused_final_runs": reused,
               "settings": {"scale": args.scale, "mixer": mixer, "lrs": args.lrs,
                            "transferred_lr_scales": args.transferred_lr_scales, "variants": args.variants,
                            "eval_window": settings[args.donors[0]]["eval_window"],
                            "eval_every": settings[args.donors[0]]["eval_every"], "jobs": jobs,
                            "threads_per_job": args.threads, "device": args.device, "kl_weight": args.kl_weight,
                            "per_donor": settings, **COMMON},
               "donors": {}}
    for donor in args.donors:
        task, block = tasks[donor], settings[donor]
        runs = {v: finals[donor][v] for v in args.variants}
        donor_loss = task.donor_loss()
        layers = ",".join(map(str, hybrid_layers(task.num_layers)))
        labels = {v: VARIANTS[v]["label"].format(layers=layers, freeze_steps=block["freeze_steps"])
                  for v in args.variants}
        results["donors"][donor] = {
            "donor_loss": donor_loss, "labels": labels, "sweeps": sweeps[donor],
            "sweep_steps": (max(1, round(block["steps"] * scale["sweep_fraction"]))
                            if any(len(v) > 1 for v in sweeps[donor].values()) else 0),
            "summary": summarize(runs, donor_loss),
            "runs": runs,
            "settings_line": (f"{block['steps']} steps × {block['batch_size']} blocks of {block['block_size']} "
                              f"tokens ({block['steps'] * block['batch_size'] * block['block_size']:,} tokens), "
                              f"warm-up {min(block['warmup_steps'], block['steps'] // 4)}, cosine to 0.1×, "
                              "AdamW (0.9, 0.95), wd 0.1 on matrices, clip 1"),
        }
        donor_info = task.path / "donor" / "pretraining.json"
        if donor_info.is_file():
            results["donors"][donor]["donor_pretraining"] = json.loads(donor_info.read_text())
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--mixers", nargs="+", choices=MIXERS, default=MIXERS,
                        help="linear-cost mixers replacing attention, one results folder each")
    parser.add_argument("--donors", nargs="+", choices=["stories260K", "gutenberg"], default=["stories260K"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--lrs", nargs="+", type=float, help="learning rates swept per variant")
    parser.add_argument("--transferred-lr-scales", nargs="+", type=float,
                        help="scales of the lr of the copied weights swept per transferred variant")
    parser.add_argument("--steps", type=int, help="optimizer steps of each full run (default: the scale's)")
    parser.add_argument("--batch-size", type=int, help="blocks per optimizer step (default: the scale's)")
    parser.add_argument("--eval-every", type=int, help="steps between validation evaluations (default: the scale's)")
    parser.add_argument("--donor-steps", type=int, help="pretraining steps of the Gutenberg donor")
    parser.add_argument("--freeze-steps", type=int,
                        help="N of the `steps:N` freeze variant (default: an eighth of the full runs' steps)")
    parser.add_argument("--kl-weight", type=float, default=COMMON["kl_weight"])
    parser.add_argument("--jobs", type=int, help="runs side by side (default: the scale's)")
    parser.add_argument("--threads", type=int, help="torch threads per run (0: torch's default)")
    parser.add_argument("--device", help="cpu or cuda (default: the scale's)")
    parser.add_argument("--data-dir", default=os.environ.get("XATL_DATA_DIR", str(HERE.parents[2] / "shared" / "data")))
    parser.add_argument("--name", default="xatl_vs_scratch",
                        help="results folder under bench/results/ (e.g. xatl_vs_scratch/stories-800-steps)")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    args.lrs = args.lrs or scale["lrs"]
    args.transferred_lr_scales = args.transferred_lr_scales or scale["transferred_lr_scales"]
    args.threads = scale["threads"] if args.threads is None else args.threads
    args.device = args.device or scale["device"]
    if "scratch" not in args.variants:
        parser.error("the comparison needs the scratch variant")
    return args


if __name__ == "__main__":
    sys.exit(main())
