"""Generation benchmark, side by side in one run, reported as ratios:

1. state bytes and decode tokens/s at several contexts, a converted model against its attention
   donor with a key/value cache, at two sizes (stories260K converted with `xatl.convert`, and a
   random-weight model of width 512 and 8 layers), beside the ratio the bytes read per step predict;
2. our engine against transformers' `generate()` on the same converted weights, one stream;
3. aggregate decode tokens/s with 1, 4, 16 and 64 concurrent streams;
4. the decode step time of the larger converted model against the memory-bandwidth bound (bytes of
   weights and state read per step / the measured copy bandwidth of this machine);
5. with `--precisions fp32,bf16,int8` instead of 1-4: the converted model's one-stream decode
   tokens/s with each precision of weights (`xatl.serving.precision`) side by side, and the
   validation cross-entropy of each precision against fp32 on the same text (TinyStories
   validation, for the models with a real tokenizer), written to results/generation/precision.

Timings of the two sides of a comparison are interleaved (blocks of steps, round-robin) and the
median is kept: the machine is shared and noisy. torch runs with `--threads` intra-op threads.

    python bench/generation/run.py                        # everything (~15 min on 2 busy cores)
    python bench/generation/run.py --contexts 512,2048 --sizes stories260K   # a quick look
    python bench/generation/run.py --precisions fp32,bf16,int8 --contexts 512,2048,8192
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, write_results  # noqa: E402
from report import markdown, plot, precision_markdown  # noqa: E402

import xatl  # noqa: E402
from xatl.data import TextBlocks  # noqa: E402
from xatl.eval import evaluate_loss  # noqa: E402
from xatl.serving import Engine, SamplingParams, apply_precision, weight_bytes  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)


@dataclass
class Size:
    """One model size: its attention donor, the converted model, and a tokenizer for both."""

    name: str
    donor: xatl.XatlForCausalLM
    converted: xatl.XatlForCausalLM
    tokenizer: PreTrainedTokenizerFast


def stories260k(args) -> Size:
    folder = Path(args.data_dir) / "stories260K"
    donor = xatl.load_donor(str(folder / "stories260K.bin"), tokenizer=str(folder / "tok512.bin"))
    return Size("stories260K", xatl.convert(donor, mixer="attention").model,
                xatl.convert(donor, mixer=args.mixer, transfer="xatl+qkv").model, donor.tokenizer)


def random_width512(args) -> Size:
    """Width 512, 8 layers, 8 heads without grouped-query attention, Llama's 32,000-token vocabulary."""

    def build(mixer: str) -> xatl.XatlForCausalLM:
        torch.manual_seed(0)
        config = xatl.XatlConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=8, layer_mixers=[mixer] * 8,
            max_position_embeddings=max(args.contexts), bos_token_id=1, eos_token_id=2,
        )
        return xatl.XatlForCausalLM(config).eval()

    return Size("random-width512", build("attention"), build(args.mixer), word_tokenizer(32000))


def word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A tokenizer of `size` made-up words: random weights make meaningless text, but the engine
    still detokenises every token, as it would for a real vocabulary of that size."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


# ---- bytes --------------------------------------------------------------------------------------


def weight_bytes_read_per_step(model: xatl.XatlForCausalLM) -> int:
    """Weight bytes one decode step reads, as stored at the model's precision (int8's packed weights
    included): all of them, except the input embedding, of which one row is (unless the LM head
    shares it and reads it whole)."""
    total = weight_bytes(model)
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size() - embedding[0].numel() * embedding.element_size()
    return total


def copy_bandwidth(megabytes: int, repeats: int = 7) -> float:
    """Bytes moved per second (read + write) by copying one large tensor into another."""
    source = torch.randn(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # touch the pages first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * 4 / statistics.median(times)


# ---- 1. contexts ----------------------------------------------------------------------------------


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def interleaved_decode(engines: dict[str, Engine], prompt: list[int], args) -> dict[str, dict]:
    """Prefill `prompt` in each engine, then time their decode steps in alternating blocks."""
    results, streams = {}, {}
    for role, engine in engines.items():
        streams[role] = engine.submit(prompt, SamplingParams(max_new_tokens=10**9, **GREEDY))
        start = time.perf_counter()
        engine.step()  # admission: prefill, first token, first decode step
        results[role] = {"prefill_and_first_step_s": time.perf_counter() - start, "step_s": []}
        for _ in range(args.warmup_steps):
            engine.step()
        results[role]["state_bytes"] = engine.stats().state_bytes
    for _ in range(args.rounds):
        for role, engine in engines.items():
            for _ in range(args.block):
                start = time.perf_counter()
                engine.step()
                results[role]["step_s"].append(time.perf_counter() - start)
    for role, engine in engines.items():
        streams[role].cancel()
        engine.step()  # the cancelled request leaves
        step = statistics.median(results[role]["step_s"])
        results[role].update(step_median_s=step, decode_tokens_per_s=1.0 / step)
        del results[role]["step_s"]
    return results


def warm_up(engine: Engine, vocab: int) -> None:
    """Wait for the decode step compiled at load (if the engine compiles one), then two short
    requests of different lengths, so that no measurement meets a first call."""
    engine.wait_until_compiled()
    for length in (16, 24):
        list(engine.submit(random_prompt(length, vocab, seed=length), SamplingParams(max_new_tokens=6, **GREEDY)))


def context_sweep(size: Size, engines: dict[str, Engine], args) -> list[dict]:
    for engine in engines.values():
        warm_up(engine, size.donor.config.vocab_size)
    weights = {role: weight_bytes_read_per_step(engine.model) for role, engine in engines.items()}
    rows = []
    for context in args.contexts:
        prompt = random_prompt(context, size.donor.config.vocab_size, seed=context)
        measured = interleaved_decode(engines, prompt, args)
        read = {role: weights[role] + measured[role]["state_bytes"] for role in engines}
        row = {"size": size.name, "context": context, **{
            f"{role}_{key}": value for role in engines for key, value in measured[role].items()
        }}
        row.update(donor_bytes_read_per_step=read["donor"], converted_bytes_read_per_step=read["converted"],
                   predicted_speedup=read["donor"] / read["converted"],
                   measured_speedup=measured["converted"]["decode_tokens_per_s"]
                   / measured["donor"]["decode_tokens_per_s"])
        rows.append(row)
        print(f"{size.name:16s} context {context:6d}: state {row['donor_state_bytes']:>12,d} B (donor) vs "
              f"{row['converted_state_bytes']:>10,d} B; decode {row['donor_decode_tokens_per_s']:7.1f} vs "
              f"{row['converted_decode_tokens_per_s']:7.1f} tok/s: {row['measured_speedup']:.2f}x "
              f"(bytes predict {row['predicted_speedup']:.2f}x)", flush=True)
    return rows


# ---- 2. the engine against transformers' generate() -----------------------------------------------------


def versus_generate(size: Size, engines: dict[str, Engine], args) -> dict:
    model = size.converted
    prompt = random_prompt(args.prompt_tokens, model.config.vocab_size, seed=1)
    new = args.generate_tokens
    timings = {name: [] for name in engines}
    timings["transformers_generate"] = []
    outputs = {}
    for _ in range(args.generate_repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            events = list(engine.submit(prompt, SamplingParams(max_new_tokens=new, **GREEDY)))
            timings[name].append(time.perf_counter() - start)
            outputs[name] = [e.token_id for e in events]
        start = time.perf_counter()
        with torch.inference_mode():
            generated = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
        timings["transformers_generate"].append(time.perf_counter() - start)
        outputs["transformers_generate"] = generated[0, len(prompt):].tolist()
    rates = {name: new / statistics.median(t) for name, t in timings.items()}
    best = {name: new / min(t) for name, t in timings.items()}  # interference only ever slows a run down
    result = {"size": size.name, "prompt_tokens": args.prompt_tokens, "new_tokens": new,
              "tokens_per_s": rates, "best_tokens_per_s": best,
              "same_tokens": all(o == outputs["transformers_generate"] for o in outputs.values()),
              "speedup": {name: rates[name] / rates["transformers_generate"] for name in engines},
              "best_speedup": {name: best[name] / best["transformers_generate"] for name in engines}}
    print(f"{size.name:16s} one stream: " + ", ".join(f"{n} {r:.1f} tok/s" for n, r in rates.items())
          + f"; same tokens: {result['same_tokens']}", flush=True)
    return result


# ---- 3. concurrent streams ------------------------------------------------------------------------------


def concurrency(size: Size, engine: Engine, args) -> list[dict]:
    """Rounds over the stream counts (1, 4, 16, 64, 1, 4, ...): in each, the streams are admitted,
    decode `--warmup-steps` unmeasured steps, then `--concurrent-steps` timed ones; median of rounds."""
    vocab = size.converted.config.vocab_size
    rates = {streams: [] for streams in args.streams}
    for _ in range(args.rounds):
        for streams in args.streams:
            params = SamplingParams(max_new_tokens=2 + args.warmup_steps + args.concurrent_steps, **GREEDY)
            handles = [engine.submit(random_prompt(args.prompt_tokens, vocab, seed=i), params)
                       for i in range(streams)]
            engine.step()  # every stream is admitted (prefilled) and decodes its first step
            for _ in range(args.warmup_steps):
                engine.step()
            start = time.perf_counter()
            while engine.step():
                pass
            rates[streams].append(streams * args.concurrent_steps / (time.perf_counter() - start))
            assert all(sum(e.token_id is not None for e in h) == params.max_new_tokens for h in handles)
    rows = [{"size": size.name, "streams": streams, "decode_tokens_per_s": statistics.median(rates[streams]),
             "best_decode_tokens_per_s": max(rates[streams])} for streams in args.streams]
    for row in rows:
        row["speedup_over_one_stream"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
        print(f"{size.name:16s} {row['streams']:3d} streams: {row['decode_tokens_per_s']:8.1f} tok/s "
              f"({row['speedup_over_one_stream']:.2f}x one stream)", flush=True)
    return rows


# ---- 4. the bandwidth bound -----------------------------------------------------------------------------


def bandwidth_bound(context_rows: list[dict], bandwidth: float) -> list[dict]:
    rows = []
    for row in context_rows:
        for role in ("converted", "donor"):
            bytes_read = row[f"{role}_bytes_read_per_step"]
            bound = bytes_read / bandwidth
            rows.append({"size": row["size"], "model": role, "context": row["context"],
                         "bytes_read_per_step": bytes_read, "bound_s": bound,
                         "step_s": row[f"{role}_step_median_s"], "times_bound": row[f"{role}_step_median_s"] / bound})
    return rows


# ---- 5. precisions --------------------------------------------------------------------------------------


def precision_sweep(size: Size, args) -> tuple[list[dict], list[dict]]:
    """Decode tokens/s of the converted model at each precision, interleaved, at each context; and the
    cross-entropy of the donor and the converted model at each precision on the same text."""
    models = {p: copy.deepcopy(size.converted) for p in args.precisions}
    engines = {p: Engine(model, size.tokenizer, background=False, precision=p, prefill_chunk=None)
               for p, model in models.items()}  # the whole prompt at admission: every timed step decodes
    for engine in engines.values():
        warm_up(engine, size.converted.config.vocab_size)
    speed = []
    for context in args.contexts:
        prompt = random_prompt(context, size.converted.config.vocab_size, seed=context)
        measured = interleaved_decode(engines, prompt, args)
        base = measured[args.precisions[0]]["decode_tokens_per_s"]
        for precision, engine in engines.items():
            speed.append({"size": size.name, "context": context, "precision": precision,
                          "weight_bytes": weight_bytes(engine.model), **measured[precision],
                          f"speedup_over_{args.precisions[0]}": measured[precision]["decode_tokens_per_s"] / base})
        print(f"{size.name:16s} context {context:6d}: " + ", ".join(
            f"{p} {measured[p]['decode_tokens_per_s']:.1f} tok/s" for p in engines), flush=True)
    quality = []
    if size.name != "random-width512":  # made-up words: no real text to score
        text = Path(args.data_dir) / "tinystories_val_subset" / "tinystories_val.txt"
        blocks = list(TextBlocks([text], size.tokenizer, args.eval_block, keep_partial=False))[: args.eval_blocks]
        for role, model in (("donor", size.donor), ("converted", size.converted)):
            quantised = {p: apply_precision(copy.deepcopy(model), p) for p in args.precisions}
            losses = {p: {"parallel": evaluate_loss(m, blocks, batch_size=4).loss,
                          "decode": decode_cross_entropy(m, blocks)} for p, m in quantised.items()}
            for precision, loss in losses.items():
                quality.append({"size": size.name, "model": role, "precision": precision,
                                "tokens": len(blocks) * (args.eval_block - 1), **{
                                    f"{form}_cross_entropy": value for form, value in loss.items()}, **{
                                    f"{form}_relative_to_fp32": value / losses["fp32"][form] - 1
                                    for form, value in loss.items() if "fp32" in losses}})
            print(f"{size.name:16s} {role} cross-entropy (parallel / decode): " + ", ".join(
                f"{p} {loss['parallel']:.4f} / {loss['decode']:.4f}" for p, loss in losses.items()), flush=True)
    return speed, quality


@torch.inference_mode()
def decode_cross_entropy(model: xatl.XatlForCausalLM, blocks: list[torch.Tensor]) -> float:
    """Cross-entropy of next-token predictions made as the engine serves one stream: one decode step
    per token, through the recurrent state (int8 activations are then quantised per token)."""
    nats, tokens = 0.0, 0
    for block in blocks:
        states = [None] * len(model.mixers)
        for t in range(len(block) - 1):
            logits, states = model.decode_step(block[None, t : t + 1], states, torch.tensor([[t]]))
            nats += float(torch.nn.functional.cross_entropy(logits.float(), block[t + 1 : t + 2]))
            tokens += 1
    return nats / tokens


def precision_run(args) -> None:
    builders = {"stories260K": stories260k, "random-width512": random_width512}
    result = {"settings": dict(vars(args)), "load_average_at_start": os.getloadavg(), "speed": [], "quality": []}
    for name in args.sizes.split(","):
        speed, quality = precision_sweep(builders[name](args), args)
        result["speed"] += speed
        result["quality"] += quality
    result["load_average_at_end"] = os.getloadavg()
    result["environment"] = environment()
    print(f"wrote {write_results('generation/precision', result, precision_markdown(result))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--sizes", default="stories260K,random-width512")
    parser.add_argument("--mixer", default="gla", help="mixer of the converted models")
    parser.add_argument("--contexts", default="512,2048,8192,16384", type=ints)
    parser.add_argument("--streams", default="1,4,16,64", type=ints)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of every model; results of bfloat16 go to results/generation/bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="run our engine's decode step eagerly only")
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=None,
                        help="e.g. fp32,bf16,int8: measure these weight precisions (eager) instead of 1-4")
    parser.add_argument("--eval-block", type=int, default=256, help="tokens per cross-entropy block")
    parser.add_argument("--eval-blocks", type=int, default=32, help="blocks of text for the cross-entropy")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks of decode steps per context")
    parser.add_argument("--block", type=int, default=4, help="decode steps per block")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--generate-tokens", type=int, default=128)
    parser.add_argument("--generate-repeats", type=int, default=5)
    parser.add_argument("--concurrent-steps", type=int, default=16, help="timed decode steps per round")
    parser.add_argument("--copy-megabytes", type=int, default=256)
    parser.add_argument("--data-dir", default=os.environ.get("XATL_DATA_DIR", "../shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.precisions:
        return precision_run(args)
    builders = {"stories260K": stories260k, "random-width512": random_width512}

    result = {"settings": {k: v for k, v in vars(args).items()}, "load_average_at_start": os.getloadavg(),
              "contexts": [], "versus_generate": [], "concurrency": [], "parameters": {}}
    result["copy_bandwidth_bytes_per_s"] = copy_bandwidth(args.copy_megabytes)
    print(f"copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s (read + write)", flush=True)
    for name in args.sizes.split(","):
        size = builders[name](args)
        dtype = getattr(torch, args.dtype)
        size.donor, size.converted = size.donor.to(dtype), size.converted.to(dtype)
        result["parameters"][name] = {role: model.num_parameters() for role, model in
                                      (("donor", size.donor), ("converted", size.converted))}
        compiled = not args.no_compile
        # prefill_chunk=None: the whole prompt at admission, so that every timed step is a decode step
        engines = {role: Engine(model, size.tokenizer, background=False, compile=compiled, prefill_chunk=None)
                   for role, model in (("donor", size.donor), ("converted", size.converted))}
        result["contexts"] += context_sweep(size, engines, args)
        ours = {"engine_eager": Engine(size.converted, size.tokenizer, background=False, prefill_chunk=None)}
        if compiled:
            ours["engine_compiled"] = engines["converted"]
        result["versus_generate"].append(versus_generate(size, ours, args))
        result["concurrency"] += concurrency(size, engines["converted"], args)
    result["copy_bandwidth_bytes_per_s_at_end"] = copy_bandwidth(args.copy_megabytes)
    bandwidth = max(result["copy_bandwidth_bytes_per_s"], result["copy_bandwidth_bytes_per_s_at_end"])
    result["bandwidth"] = bandwidth_bound(result["contexts"], bandwidth)
    result["load_average_at_end"] = os.getloadavg()
    result["environment"] = environment()
    folder = write_results("generation" if args.dtype == "float32" else f"generation/{args.dtype}",
                           result, markdown(result))
    plot(result, folder / "contexts.png")
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
