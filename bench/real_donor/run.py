"""A real donor, side by side in one run: SmolLM2-135M-Instruct (the shared GGUF, Q4_1, read through
`xatl convert`'s GGUF path) converted to gated linear attention and judged against the donor itself.

Two conversions, both `xatl+qkv`: GLA in all 30 layers, and a hybrid that keeps attention in 3
layers (0, 15, 29). Each goes through three stages and is scored after each:

    step 0       the conversion as it comes out of `xatl convert`
    + AT         layer-wise attention transfer (`xatl.training.attention_transfer`): every GLA mixer
                 learns its donor attention's output from the donor's hidden states, all else frozen
    + E2E        end-to-end training (`xatl.training.train`) on the same text, by default of the
                 mixers alone with logit distillation from the donor (KL, weight 0.5): at this budget
                 it moved validation loss more per step than training every weight on text alone

Score: cross-entropy (nats/token, 512-token windows, float32) on `gutenberg_mini/valid` (the first
windows of each of its 3 books) and on the TinyStories subset (its first windows), beside the
donor's, with the token budget and the wall time of each stage. Training text: gutenberg_mini/train.
Then, with the engine (`xatl.serving.Engine`, eager), decode tokens/s and state bytes of the donor
and both conversions at 512 / 2k / 8k / 16k tokens of context (a random prompt fills it), in
float32 and bfloat16; decode steps of the models (`--decode-models`) are timed in interleaved
blocks, medians kept, since the machine is shared. `--fill-tokens N` prefills only N tokens of a
longer context and tiles the attention caches to its length (the same decode-step work, without a
16k-token prefill through the donor's attention). Results are written after training and after
every decode row, so a run cut short still reports what it measured.

Everything runs in this one process with one torch thread (`--threads`). Stage models and results
are cached under bench/.cache/real_donor/ (keyed by the settings), so an interrupted run continues;
results go to bench/results/real_donor/ (`--tag` for a subfolder): results.json, README.md, curves.png.

    .venv/bin/python bench/real_donor/run.py                 # the default budget: about an hour here
    .venv/bin/python bench/real_donor/run.py --at-tokens 20M --e2e-tokens 20M --device cuda \
        --batch-size 16 --block-size 512 --threads 0 --tag gpu  # where a GPU is lent
    .venv/bin/python bench/real_donor/run.py --at-tokens 4k --e2e-tokens 2k --contexts 512 \
        --eval-windows 1 --stories-windows 1 --decode-dtypes float32 --tag quick   # a quick look
    .venv/bin/python bench/real_donor/run.py --at-tokens 8k --e2e-tokens 2k --block-size 128 \
        --eval-windows 1 --stories-windows 1 --decode-dtypes bfloat16,float32 --decode-models donor,gla \
        --fill-tokens 2048     # what fitted ~70 minutes on the shared 2-core machine (load 12-15)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import environment, write_results  # noqa: E402
from report import markdown, plot  # noqa: E402

import xatl  # noqa: E402
from xatl.data import TextBlocks  # noqa: E402
from xatl.eval import evaluate_loss  # noqa: E402
from xatl.serving import Engine, SamplingParams  # noqa: E402
from xatl.training import TrainConfig, train  # noqa: E402
from xatl.training.attention_transfer import AttentionTransferConfig, attention_transfer  # noqa: E402

GGUF = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = HERE.parents[1] / "bench" / ".cache" / "real_donor"
PROMPT = "Once upon a time, there was a little"
GREEDY = dict(temperature=0.0, ignore_eos=True)


def count(text: str) -> int:
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--data-dir", default=os.environ.get("XATL_DATA_DIR", "../shared/data"))
    parser.add_argument("--hybrid-layers", default="0,15,29", type=ints, help="attention layers of the hybrid")
    parser.add_argument("--at-tokens", default="150k", type=count, help="attention-transfer budget per model")
    parser.add_argument("--e2e-tokens", default="20k", type=count, help="end-to-end budget per model")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per training block")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--at-lr", type=float, default=3e-3)
    parser.add_argument("--e2e-lr", type=float, default=1e-3)
    parser.add_argument("--e2e-train", choices=["all", "mixers"], default="mixers",
                        help="E2E trains every weight, or the mixers alone (the rest as the donor left it)")
    parser.add_argument("--distill", default="kl", help="E2E distillation from the donor: '', kl, kl,hidden")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="training autocast")
    parser.add_argument("--eval-windows", type=int, default=2, help="512-token windows per Gutenberg book")
    parser.add_argument("--stories-windows", type=int, default=6, help="512-token windows of TinyStories")
    parser.add_argument("--contexts", default="512,2048,8192,16384", type=ints)
    parser.add_argument("--decode-dtypes", default="float32,bfloat16")
    parser.add_argument("--decode-models", default="donor,gla,hybrid", help="the models timed decoding")
    parser.add_argument("--fill-tokens", type=int, default=0,
                        help="longer contexts: prefill this many tokens and tile the key/value caches to the "
                             "context (a decode step does the same work; 0: prefill the whole context)")
    parser.add_argument("--decode-rounds", type=int, default=4, help="interleaved blocks of decode steps")
    parser.add_argument("--decode-block", type=int, default=3, help="decode steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="results go to bench/results/real_donor/TAG")
    return parser.parse_args()


# ---- data ---------------------------------------------------------------------------------------


def eval_sets(args, tokenizer) -> dict[str, list[torch.Tensor]]:
    """The first `--eval-windows` 512-token windows of each Gutenberg validation book, and the first
    `--stories-windows` of the TinyStories subset."""
    data = Path(args.data_dir)
    books = sorted((data / "gutenberg_mini" / "valid").glob("*.txt"))
    gutenberg = [w for book in books for w in islice(TextBlocks([book], tokenizer, 512), args.eval_windows)]
    stories = list(islice(TextBlocks([data / "tinystories_val_subset" / "tinystories_val.txt"], tokenizer, 512),
                          args.stories_windows))
    return {"gutenberg_valid": gutenberg, "tinystories": stories}


def cross_entropy(model, sets, device, cache: Path | None = None) -> dict[str, float]:
    if cache is not None and cache.is_file():  # scored by an interrupted run of the same settings
        scores = json.loads(cache.read_text())
        print("    CE (cached) " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "eval_seconds"))
        return scores
    start = time.perf_counter()
    scores = {name: evaluate_loss(model, blocks, batch_size=4).loss for name, blocks in sets.items()}
    scores["eval_seconds"] = time.perf_counter() - start
    print("    CE " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "eval_seconds"), flush=True)
    if cache is not None:
        cache.write_text(json.dumps(scores) + "\n")
    return scores


# ---- stages -------------------------------------------------------------------------------------


def cached_stage(folder: Path, run_stage, model):
    """Run a stage, or load its model and record when a finished run left them in `folder`."""
    record_file = folder / "stage.json"
    if record_file.is_file():
        state = xatl.XatlForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        model.load_state_dict(state)
        print(f"  (cached: {folder.name})", flush=True)
        return json.loads(record_file.read_text())
    record = run_stage()
    model.save_pretrained(folder)
    record_file.write_text(json.dumps(record) + "\n")
    return record


def run_attention_transfer(model, teacher, blocks, args) -> dict:
    config = AttentionTransferConfig(max_tokens=args.at_tokens, batch_size=args.batch_size, lr=args.at_lr,
                                     warmup_steps=5, precision=args.precision, seed=args.seed, shuffle_buffer=2000,
                                     log_every=5)
    events = []
    start = time.perf_counter()
    result = attention_transfer(model, teacher, blocks, config, on_step=_printing(events))
    return {"seconds": time.perf_counter() - start, "tokens": result.tokens, "steps": result.step,
            "config": vars(config), "final_layer_losses": result.layer_losses,
            "events": [e for e in events if e["event"] == "train"]}


def run_end_to_end(model, teacher, blocks, args) -> dict:
    frozen = {n for n, _ in model.named_parameters() if ".mixer." not in n} if args.e2e_train == "mixers" else set()
    config = TrainConfig(max_tokens=args.e2e_tokens, batch_size=args.batch_size, lr=args.e2e_lr, warmup_steps=3,
                         precision=args.precision, seed=args.seed, shuffle_buffer=2000, log_every=5,
                         distill=args.distill, freeze="steps:1000000000" if frozen else "none")
    events = []
    start = time.perf_counter()
    result = train(model, blocks, config, teacher=teacher if args.distill else None, transferred=frozen,
                   on_step=_printing(events))
    return {"seconds": time.perf_counter() - start, "tokens": result.tokens, "steps": result.step,
            "config": {k: v for k, v in vars(config).items()}, "trained": args.e2e_train,
            "events": [e for e in events if e["event"] == "train"]}


def _printing(events: list):
    def on_step(event):
        events.append(event)
        if event["event"] == "train":
            print(f"    step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} "
                  f"({event['tokens_per_second'] or 0:.0f} tok/s)", flush=True)
    return on_step


def sample(model, tokenizer, tokens: int = 24) -> str:
    engine = Engine(model.eval(), tokenizer, background=False)
    prompt = tokenizer(PROMPT)["input_ids"]
    return "".join(e.text for e in engine.submit(prompt, SamplingParams(max_new_tokens=tokens, **GREEDY)))


# ---- decoding -----------------------------------------------------------------------------------


def decode_sweep(models: dict, tokenizer, args, on_row=None) -> list[dict]:
    """Per dtype and context: state bytes and median decode step of every model, interleaved;
    `on_row(rows)` after each (the results so far are written, in case the run is cut short)."""
    rows = []
    for dtype_name in args.decode_dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        engines = {name: Engine(copy.deepcopy(m).to(dtype).eval(), tokenizer, background=False)
                   for name, m in models.items()}
        if args.fill_tokens:
            for engine in engines.values():
                _tile_long_prefills(engine._batch, args.fill_tokens)
        for context in args.contexts:
            prompt = torch.randint(3, tokenizer.vocab_size, (context,),
                                   generator=torch.Generator().manual_seed(context)).tolist()
            measured, streams = {}, {}
            for name, engine in engines.items():
                streams[name] = engine.submit(prompt, SamplingParams(max_new_tokens=10**9, **GREEDY))
                start = time.perf_counter()
                engine.step()  # prefill, first token, first decode step
                measured[name] = {"prefill_s": time.perf_counter() - start, "steps": []}
                engine.step()
                measured[name]["state_bytes"] = engine.stats().state_bytes
            for _ in range(args.decode_rounds):
                for name, engine in engines.items():
                    for _ in range(args.decode_block):
                        start = time.perf_counter()
                        engine.step()
                        measured[name]["steps"].append(time.perf_counter() - start)
            row = {"dtype": dtype_name, "context": context}
            for name, engine in engines.items():
                streams[name].cancel()
                engine.step()
                step = statistics.median(measured[name]["steps"])
                row[name] = {"state_bytes": measured[name]["state_bytes"], "decode_tokens_per_s": 1 / step,
                             "step_median_s": step, "prefill_s": measured[name]["prefill_s"]}
            for name in models:
                if name != "donor":
                    row[name]["speedup"] = row[name]["decode_tokens_per_s"] / row["donor"]["decode_tokens_per_s"]
            rows.append(row)
            print(f"  {dtype_name} {context:6d}: " + "; ".join(
                f"{n} {row[n]['decode_tokens_per_s']:.1f} tok/s, {row[n]['state_bytes'] / 2**20:.1f} MiB"
                for n in models), flush=True)
            if on_row is not None:
                on_row(rows)
        del engines
    return rows


def _tile_long_prefills(batch, fill: int) -> None:
    """Prompts longer than `fill` tokens: the engine's prefill runs on the first `fill` and each
    attention layer's key/value cache is tiled to the prompt's length, so the decode steps that
    follow attend over as many cached tokens as after a whole prefill (the same work; the cached
    values repeat). Linear-cost layers keep their fixed-size state. A prefill of 16k tokens through
    the donor's attention costs this shared CPU tens of minutes; its decode step does not."""
    prefill = batch.prefill

    def tiled(input_ids):
        length = input_ids.shape[1]
        if length <= fill:
            return prefill(input_ids)
        logits, states = prefill(input_ids[:, :fill])
        repeats = -(-length // fill)
        for i, state in enumerate(states):
            if batch.is_attention[i]:  # (1, Hkv, fill, hd) -> (1, Hkv, length, hd)
                states[i] = {k: t.repeat(1, 1, repeats, 1)[:, :, :length].contiguous() for k, t in state.items()}
        return logits, states

    batch.prefill = tiled


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    settings = {k: v for k, v in vars(args).items() if k not in ("tag", "contexts", "decode_dtypes", "decode_rounds",
                                                                 "decode_block", "decode_models", "fill_tokens",
                                                                 "threads", "data_dir")}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    cache = CACHE / key
    cache.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args), "load_average_at_start": os.getloadavg(), "models": {}}
    wall = time.perf_counter()

    # 1. The donor, read from the GGUF file, and its scores
    start = time.perf_counter()
    donor = xatl.load_donor(str(Path(args.data_dir) / GGUF))
    tokenizer = donor.tokenizer
    teacher = xatl.convert(donor, mixer="attention").model.float().to(device).eval()
    result["donor"] = {"source": GGUF, "load_seconds": time.perf_counter() - start,
                       "quantization": donor.quantization, "parameters": teacher.num_parameters()}
    sets = eval_sets(args, tokenizer)
    result["eval_tokens"] = {name: sum(len(b) - 1 for b in blocks) for name, blocks in sets.items()}
    print(f"donor: {donor.quantization['file_type']}, eval tokens {result['eval_tokens']}", flush=True)
    result["donor"]["ce"] = cross_entropy(teacher, sets, device, cache / "donor-ce.json")
    result["donor"]["sample"] = sample(teacher, tokenizer)
    train_blocks = TextBlocks([Path(args.data_dir) / "gutenberg_mini" / "train"], tokenizer, args.block_size)

    # 2. The conversions through their stages
    finals = {"donor": teacher}
    for name, attention_layers in (("gla", []), ("hybrid", args.hybrid_layers)):
        print(f"{name}: attention at {attention_layers or 'no layer'}", flush=True)
        model = xatl.convert(donor, mixer="gla", attention_layers=attention_layers, transfer="xatl+qkv",
                             seed=args.seed).model.float().to(device)
        entry = {"attention_layers": attention_layers, "parameters": model.num_parameters(), "ce": {}}
        entry["ce"]["step0"] = cross_entropy(model, sets, device, cache / f"{name}-step0-ce.json")
        print("  attention transfer", flush=True)
        entry["attention_transfer"] = cached_stage(
            cache / f"{name}-at", lambda m=model: run_attention_transfer(m, teacher, train_blocks, args), model)
        entry["ce"]["attention_transfer"] = cross_entropy(model, sets, device, cache / f"{name}-at" / "ce.json")
        print("  end to end", flush=True)
        entry["end_to_end"] = cached_stage(
            cache / f"{name}-e2e", lambda m=model: run_end_to_end(m, teacher, train_blocks, args), model)
        entry["ce"]["end_to_end"] = cross_entropy(model, sets, device, cache / f"{name}-e2e" / "ce.json")
        entry["sample"] = sample(model, tokenizer)
        result["models"][name] = entry
        finals[name] = model.eval()
    result["training_wall_seconds"] = time.perf_counter() - wall

    # 3. Decoding against the donor, with the engine; the results are written as they come
    print("decode", flush=True)
    start = time.perf_counter()
    timed = {name: finals[name] for name in args.decode_models.split(",")}
    planned = len(args.contexts) * len(args.decode_dtypes.split(","))

    def save(rows: list[dict]) -> Path:
        result["decode"] = rows
        result["decode_complete"] = len(rows) == planned
        result["decode_seconds"] = time.perf_counter() - start
        result["wall_seconds"] = time.perf_counter() - wall
        result["load_average_at_end"] = os.getloadavg()
        result["environment"] = environment()
        folder = write_results("real_donor" + (f"/{args.tag}" if args.tag else ""), result, markdown(result))
        plot(result, folder / "curves.png")
        return folder

    save([])
    folder = save(decode_sweep(timed, tokenizer, args, on_row=save) if args.contexts else [])
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
