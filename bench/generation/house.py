"""Decode speed of the engine before and after a refactor, side by side in one run (issue 15).

The code before (a commit, default 52e40a3: the engine's own forward over the layers) is checked out
into a temporary git worktree; worker processes import `xatl` from that worktree ("before") and from
this checkout ("after", and "control": a second process of the same code), build the same models
with the same seeds, admit the same prompts into an `Engine`, and then take turns: each round the
driver asks each side in turn (the order rotating) for a block of decode steps (`Engine.step`: one
batched token for every stream, sampled and detokenised), timed step by step. Only one side runs at
a time, so they never compete for the cores. Each round gives a paired ratio of block medians,
before / after (decode speed after over before: > 1 is faster) and after / control (the same code
against itself: how far noise alone moves the ratio on this machine); the medians over rounds are
reported beside the ratio of the overall medians.

    python bench/generation/house.py                      # ~15 min on 2 busy cores
    python bench/generation/house.py --rounds 5 --block 10 --cases gla-stories260K-b1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# name: (model, mixer plan, streams, prompt length of the first stream; each next one is 3 shorter)
CASES = {
    "gla-stories260K-b1": ("stories260K", "gla", 1, 64),
    "gla-stories260K-b16": ("stories260K", "gla", 16, 64),
    "mamba2-width512-b1": ("width512", ["mamba2"] * 8, 1, 64),
    "mamba2-width512-b8": ("width512", ["mamba2"] * 8, 8, 64),
    "hybrid-width512-b8": ("width512", ["gla", "attention"] * 4, 8, 64),
}


# ---- the worker: one side, one process ---------------------------------------------------------------


def build_engine(case: tuple, data_dir: Path):
    import torch

    import xatl
    from xatl.serving import Engine, SamplingParams

    model_name, plan, streams, prompt_length = case
    if model_name == "stories260K":
        folder = data_dir / "stories260K"
        donor = xatl.load_donor(str(folder / "stories260K.bin"), tokenizer=str(folder / "tok512.bin"))
        torch.manual_seed(0)
        model, tokenizer = xatl.convert(donor, mixer=plan, transfer="xatl+qkv").model, donor.tokenizer
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        torch.manual_seed(0)
        config = xatl.XatlConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
            layer_mixers=list(plan), bos_token_id=1, eos_token_id=2,
        )
        model = xatl.XatlForCausalLM(config).eval()
        backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(32000)}, unk_token="w0"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")
    engine = Engine(model.eval(), tokenizer, max_batch_size=streams, background=False)
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    for i in range(streams):  # prompts of different lengths: attention layers decode left-padded rows
        prompt = torch.randint(3, vocab, (prompt_length - 3 * i,), generator=generator).tolist()
        engine.submit(prompt, SamplingParams(max_new_tokens=10**9, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    engine.step()  # admission: every prefill, then the first decode step
    return engine, time.perf_counter() - start


def worker(args) -> None:
    import torch

    import xatl

    torch.set_num_threads(args.threads)
    engines, admit_s = {}, {}
    for name in args.cases:
        engines[name], admit_s[name] = build_engine(CASES[name], Path(args.data_dir))
        for _ in range(args.warmup):
            engines[name].step()
    print(json.dumps({"ready": True, "xatl": str(Path(xatl.__file__).parent), "admit_s": admit_s}), flush=True)
    for line in sys.stdin:
        name, steps = json.loads(line)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engines[name].step()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


# ---- the driver ----------------------------------------------------------------------------------------


class Side:
    def __init__(self, role: str, source: Path, args):
        env = {**os.environ, "PYTHONPATH": str(source), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
                   "--warmup", str(args.warmup), "--data-dir", str(args.data_dir), "--cases", *args.cases]
        # cwd: the code's own folder, so that `import xatl` finds that copy first
        self.process = subprocess.Popen(command, cwd=source, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.role = role
        self.hello = json.loads(self.process.stdout.readline())
        expected = (source / "xatl").resolve()
        if Path(self.hello["xatl"]).resolve() != expected:
            raise RuntimeError(f"the {role} side imported xatl from {self.hello['xatl']}, not {expected}")

    def block(self, name: str, steps: int) -> list[float]:
        self.process.stdin.write(json.dumps([name, steps]) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-commit", default="52e40a3", help="the code before (a commit of this repository)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--block", type=int, default=8, help="decode steps per turn")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=os.environ.get("XATL_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(HERE.parent))
    from common import environment, write_results

    env = environment()
    with tempfile.TemporaryDirectory(prefix="xatl-before-") as scratch:
        before_tree = Path(scratch) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before_commit], cwd=REPO,
                       check=True, capture_output=True)
        try:
            sides = {"before": Side("before", before_tree, args), "after": Side("after", REPO, args),
                     "control": Side("control", REPO, args)}
            steps = {role: {name: [] for name in args.cases} for role in sides}
            blocks = {role: {name: [] for name in args.cases} for role in sides}  # each block's median
            roles = list(sides)
            for round_index in range(args.rounds):
                order = roles[round_index % 3:] + roles[: round_index % 3]
                for name in args.cases:
                    for role in order:
                        times = sides[role].block(name, args.block)
                        steps[role][name] += times
                        blocks[role][name].append(statistics.median(times))
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            admit = {role: side.hello["admit_s"] for role, side in sides.items()}
            for side in sides.values():
                side.close()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=REPO, check=False)

    cases = {}
    for name in args.cases:
        medians = {role: statistics.median(steps[role][name]) for role in steps}
        streams = CASES[name][2]
        cases[name] = {
            "streams": streams,
            "plan": CASES[name][1],
            "model": CASES[name][0],
            **{f"{role}_step_median_s": medians[role] for role in medians},
            **{f"{role}_decode_tokens_per_s": streams / medians[role] for role in medians},
            **{f"{role}_admit_s": admit[role][name] for role in admit},
            "decode_ratio_after_over_before": statistics.median(
                b / a for b, a in zip(blocks["before"][name], blocks["after"][name])),
            "control_ratio_after_over_control": statistics.median(
                c / a for c, a in zip(blocks["control"][name], blocks["after"][name])),
            "ratio_of_medians_after_over_before": medians["before"] / medians["after"],
            "steps_per_side": len(steps["after"][name]),
        }
    payload = {"environment": env, "before_commit": args.before_commit,
               "settings": {k: getattr(args, k) for k in ("rounds", "block", "warmup", "threads")}, "cases": cases}
    lines = [
        "# Engine decode before and after issue 15 (the engine through `decode_step`)",
        "",
        f"Before: commit {args.before_commit}; after: this commit; control: this commit again, in a third process. "
        f"All in one run, in separate processes taking turns ({args.rounds} rounds of {args.block} steps each, "
        f"the order rotating), {args.threads} torch thread(s). Ratios are of decode speed, paired round by round "
        f"(medians of the rounds' block-median ratios); > 1: after is faster. The control ratio shows what noise "
        f"alone does to a ratio on this machine.",
        "",
        "| case | streams | before tok/s | after tok/s | control tok/s | decode ratio after/before "
        "(median of rounds) | ratio of medians | control ratio after/control (noise) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in cases.items():
        lines.append(f"| {name} | {row['streams']} | {row['before_decode_tokens_per_s']:.1f} | "
                     f"{row['after_decode_tokens_per_s']:.1f} | {row['control_decode_tokens_per_s']:.1f} | "
                     f"{row['decode_ratio_after_over_before']:.3f} | {row['ratio_of_medians_after_over_before']:.3f} | "
                     f"{row['control_ratio_after_over_control']:.3f} |")
    ratios = [row["decode_ratio_after_over_before"] for row in cases.values()]
    controls = [row["control_ratio_after_over_control"] for row in cases.values()]
    payload["geometric_mean_decode_ratio"] = statistics.geometric_mean(ratios)
    payload["geometric_mean_control_ratio"] = statistics.geometric_mean(controls)
    lines += ["", f"Geometric mean of the decode ratios: {payload['geometric_mean_decode_ratio']:.3f}; of the "
              f"control ratios (the same code against itself): {payload['geometric_mean_control_ratio']:.3f}."]
    folder = write_results("generation/house", payload, "\n".join(lines))
    print("\n".join(lines))
    print(f"written to {folder.relative_to(REPO)}")


if __name__ == "__main__":
    main()
