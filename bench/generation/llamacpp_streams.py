"""llama.cpp's parallel slots beside our continuous batching (issue 16): N concurrent greedy streams
at one context, one thread, aggregate decode tokens/s side by side. Run through `llamacpp.py --streams`.

- llama.cpp (llama-cpp-python's low-level ctypes API) runs as its server and `parallel` example do:
  ONE context with `n_seq_max = N`, each stream its own sequence id, each decode step ONE
  `llama_batch` of N tokens (one per sequence, logits for each), flash attention on. The key/value
  cache is laid out as the server lays it out for `-np N` (`kv_unified` false: one buffer per
  sequence of `context + steps` tokens, attention over a sequence's own tokens); with `--stream-kv
  split,unified` also as one unified buffer shared by the sequences.
- The prompt (random, `--stream-context` tokens) is the same for every stream. llama.cpp evaluates
  it once into sequence 0 and copies it to the others (`llama_memory_seq_cp`: a copy of the buffer
  between split buffers; shared cells in a unified one, which only a common prefix allows). Our
  engine has no prefix sharing: all N requests are submitted and the engine prefills each at admission.
- Only the decode steps after all N streams run are timed, the sides' steps interleaved in blocks
  (as `run.interleaved_decode` does for one stream): aggregate decode tokens/s = N / the median step.
  Every stream of a side must have generated the same tokens (same prompt, greedy): a check that
  the copies of the prompt's cache and the batched steps are right.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from llamacpp import write_gguf  # bench/generation: on the path of llamacpp.py, which runs this
from run import GREEDY, random_prompt, random_width512, warm_up

from xatl.serving import Engine, SamplingParams

PAIRS = {"int8": "Q8_0", "bf16": "F16", "fp32": "F16"}  # xatl precision -> llama.cpp file type it is set against


class LlamaCppSlots:
    """One llama.cpp context serving `streams` greedy sequences, a batch of one token each per step."""

    def __init__(self, model, streams: int, n_ctx: int, threads: int, unified: bool, cache_bytes_per_token: int):
        import llama_cpp as lc

        self.lc, self.streams, self.unified = lc, streams, unified
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx  # split (kv_unified off): n_ctx / streams cells per sequence
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = streams
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.kv_unified = unified
        self.n_ctx = params.n_ctx
        self.ctx = lc.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {params.n_ctx} tokens for {streams} sequences")
        self.memory = lc.llama_get_memory(self.ctx)
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        self.batch = lc.llama_batch_init(max(512, streams), 0, 1)
        self.cache_bytes_per_token = cache_bytes_per_token

    def _decode(self, tokens: list[int], positions: list[int], seqs: list[int], logits: list[bool]) -> None:
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, (token, position, seq, wanted) in enumerate(zip(tokens, positions, seqs, logits)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, wanted
            batch.seq_id[i][0] = seq
        code = self.lc.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} ({len(tokens)} tokens, context of {self.n_ctx})")

    def _greedy(self, output: int) -> int:
        logits = self.lc.llama_get_logits_ith(self.ctx, output)
        return int(np.ctypeslib.as_array(logits, shape=(self.vocab,)).argmax())

    def start(self, prompt: list[int]) -> None:
        """Evaluate the prompt into sequence 0 (chunks of n_batch tokens), copy it to every other
        sequence, take the first token, and decode the first step of all."""
        self.lc.llama_memory_clear(self.memory, True)
        for start in range(0, len(prompt), 512):
            chunk = prompt[start : start + 512]
            last = start + len(chunk) == len(prompt)
            self._decode(chunk, list(range(start, start + len(chunk))), [0] * len(chunk),
                         [last and i == len(chunk) - 1 for i in range(len(chunk))])
        first = self._greedy(len(chunk) - 1)
        for seq in range(1, self.streams):
            self.lc.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)
        self.position, self.tokens, self.generated = len(prompt), [first] * self.streams, [[first] * self.streams]
        self.step()

    def step(self) -> None:
        n = self.streams
        self._decode(self.tokens, [self.position] * n, list(range(n)), [True] * n)
        self.tokens = [self._greedy(i) for i in range(n)]
        self.generated.append(self.tokens)
        self.position += 1

    def state_bytes(self) -> int:
        held = self.position * self.streams if not self.unified else (
            self.position + (self.streams - 1) * (len(self.generated) - 1))
        return self.cache_bytes_per_token * held

    def stop(self) -> bool:
        """Free the sequences; whether every stream generated the same tokens."""
        self.lc.llama_memory_clear(self.memory, True)
        return all(len(set(step)) == 1 for step in self.generated)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)


class EngineStreams:
    """Our engine with `streams` requests of one prompt, admitted (prefilled) together."""

    def __init__(self, engine: Engine, streams: int):
        self.engine, self.streams = engine, streams

    def start(self, prompt: list[int]) -> None:
        params = SamplingParams(max_new_tokens=10**9, **GREEDY)
        self.handles = [self.engine.submit(prompt, params) for _ in range(self.streams)]
        self.engine.step()  # admission: every prompt prefilled, the first tokens, the first decode step
        running = self.engine.stats().running
        if running != self.streams:
            raise RuntimeError(f"the engine runs {running} of {self.streams} streams after admission")

    def step(self) -> None:
        self.engine.step()

    def state_bytes(self) -> int:
        return self.engine.stats().state_bytes

    def stop(self) -> bool:
        for handle in self.handles:
            handle.cancel()
        self.engine.step()  # the cancelled requests leave; their events are all queued now
        tokens = [[event.token_id for event in handle if event.token_id is not None] for handle in self.handles]
        return all(t == tokens[0] for t in tokens)

    def close(self) -> None:
        pass


def interleaved_streams(sides: dict, prompt: list[int], streams: int, args) -> dict[str, dict]:
    """Start every side's streams, then time their batched decode steps in alternating blocks."""
    results = {}
    for role, side in sides.items():
        start = time.perf_counter()
        side.start(prompt)
        results[role] = {"prefill_and_first_step_s": time.perf_counter() - start, "step_s": []}
        for _ in range(args.warmup_steps):
            side.step()
        results[role]["state_bytes"] = side.state_bytes()
        print(f"  {role}: {streams} streams running after {results[role]['prefill_and_first_step_s']:.1f} s",
              flush=True)
    for _ in range(args.rounds):
        for role, side in sides.items():
            for _ in range(args.block):
                start = time.perf_counter()
                side.step()
                results[role]["step_s"].append(time.perf_counter() - start)
    for role, side in sides.items():
        step = statistics.median(results[role]["step_s"])
        results[role].update(step_median_s=step, aggregate_decode_tokens_per_s=streams / step,
                             per_stream_decode_tokens_per_s=1.0 / step, streams_agree=side.stop())
        del results[role]["step_s"]
    return results


def ratios(rates: dict[str, float]) -> dict[str, float]:
    """Each xatl precision against the llama.cpp file type of its pair, in each cache layout measured."""
    out = {}
    for role, rate in rates.items():
        if role.startswith("xatl_"):
            theirs = f"llamacpp_{PAIRS[role.removeprefix('xatl_')]}"
            for other in (theirs, f"{theirs}_unified"):
                if other in rates:
                    out[f"{role}_over_{other}"] = rate / rates[other]
    return out


def round_up(tokens: int) -> int:
    return -(-tokens // 256) * 256


def measure_streams(args, result: dict, save) -> None:
    """Fill `result` with one row per stream count, calling `save()` after each."""
    import llama_cpp as lc

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback prints everything else
    lc.llama_backend_init()
    steps = 2 + args.warmup_steps + args.rounds * args.block
    per_stream = round_up(args.stream_context + steps)
    longest = max(per_stream, round_up(args.stream_context + max(args.streams) * steps))  # the unified cache's
    size = random_width512(SimpleNamespace(contexts=[longest], mixer=args.mixer))
    config, vocab = size.donor.config, size.donor.config.vocab_size
    cache_bytes_per_token = 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim  # f16 K, V
    engines = {f"xatl_{p}": Engine(copy.deepcopy(size.converted), size.tokenizer, background=False, precision=p,
                                   prefill_chunk=None, max_batch_size=max(args.streams), compile="auto")
               for p in args.stream_precisions}
    for engine in engines.values():
        warm_up(engine, vocab)
    prompt = random_prompt(args.stream_context, vocab, seed=args.stream_context)
    result.update(stream_context=args.stream_context, llamacpp_cells_per_stream=per_stream, rows=[])
    with tempfile.TemporaryDirectory() as folder:
        models = {}
        for file_type in args.stream_file_types:
            path = Path(folder) / f"donor-{file_type}.gguf"
            write_gguf(size.donor, path, file_type)
            models[file_type] = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        for streams in args.streams:
            sides = {}
            for layout in args.stream_kv:
                # split: the server's layout for -np N, a buffer of per_stream cells per sequence;
                # unified: the shared prompt's cells once, then every sequence's own tokens
                n_ctx = streams * per_stream if layout == "split" else round_up(args.stream_context + streams * steps)
                for file_type, model in models.items():
                    role = f"llamacpp_{file_type}" + ("_unified" if layout == "unified" else "")
                    sides[role] = LlamaCppSlots(model, streams, n_ctx, args.threads, layout == "unified",
                                                cache_bytes_per_token)
            sides.update({role: EngineStreams(engine, streams) for role, engine in engines.items()})
            measured = interleaved_streams(sides, prompt, streams, args)
            llamacpp_n_ctx = {role: side.n_ctx for role, side in sides.items() if isinstance(side, LlamaCppSlots)}
            for side in sides.values():
                side.close()
            rates = {role: m["aggregate_decode_tokens_per_s"] for role, m in measured.items()}
            row = {"streams": streams, "context": args.stream_context, "llamacpp_n_ctx": llamacpp_n_ctx,
                   **{f"{role}_{key}": value for role, m in measured.items() for key, value in m.items()},
                   **ratios(rates)}
            result["rows"].append(row)
            print(f"{streams:3d} streams at {args.stream_context}: " + ", ".join(
                f"{r} {v:.1f}" for r, v in rates.items()) + " tok/s aggregate; " + ", ".join(
                f"{k} {v:.2f}x" for k, v in ratios(rates).items()), flush=True)
            save()
        for model in models.values():
            lc.llama_model_free(model)


# ---- the report -----------------------------------------------------------------------------------


def goals(result: dict) -> list[str]:
    """The issue's goal: 16 concurrent streams at 4k, aggregate tokens/s ≥ 3x llama.cpp's 16 slots."""
    lines = []
    for row in result["rows"]:
        if row["streams"] == 16 and row["context"] == 4096:
            for key, value in row.items():
                if key.startswith("xatl_int8_over_llamacpp_Q8_0"):
                    lines.append(f"- 16 streams at 4,096: {key}: {'met' if value >= 3 else 'missed'} "
                                 f"({value:.2f}x, goal ≥ 3x)")
    return lines or ["- not measured (the goal is at 16 streams, context 4,096, int8 against Q8_0)"]


def markdown(result: dict) -> str:
    rows = result["rows"]
    roles = [key.removesuffix("_aggregate_decode_tokens_per_s") for key in rows[0]
             if key.endswith("_aggregate_decode_tokens_per_s")]
    ratio_keys = [key for key in rows[0] if "_over_" in key]
    settings = result["settings"]
    out = [
        "# llama.cpp's parallel slots beside xatl's continuous batching (issue 16)\n",
        f"random-width512 (random-weight 66M Llama; converted: GLA). N concurrent greedy streams after the "
        f"same random prompt of {result['stream_context']:,} tokens, one thread each side "
        f"(llama.cpp n_threads=1, torch 1 thread). Aggregate decode tokens/s = N / median step, the "
        f"sides' steps interleaved in blocks ({settings['rounds']} rounds of {settings['block']} steps, "
        f"after {settings['warmup_steps']} unmeasured).\n",
        "llama.cpp (llama-cpp-python's ctypes API, as its server and `parallel` example run slots): one "
        "context with n_seq_max = N, one llama_batch of N tokens per step (one per sequence, logits for "
        "each), flash attention, f16 key/value cache; the prompt evaluated once into sequence 0 and "
        "copied to the others (`llama_memory_seq_cp`). `llamacpp_<type>`: the server's layout for "
        f"`-np N` (kv_unified off: {result['llamacpp_cells_per_stream']:,} cells per sequence, each "
        "attending over its own); `_unified`: one buffer shared by all sequences, where the copied "
        "prompt's cells are shared, not copied (a common prefix only; independent prompts would each "
        "hold their own). xatl: the engine (`xatl.serving.Engine`, max_batch_size N, no prefix "
        "sharing: each of the N prompts prefilled at admission), the converted model at the weight "
        "precisions named, its decode step compiled where `XATL_COMPILE=auto` compiles it (bf16, int8).\n",
        f"Versions: llama-cpp-python {result['versions']['llama_cpp_python']}, gguf "
        f"{result['versions']['gguf']}. llama.cpp: `{result['versions']['llama_cpp_system_info']}`\n",
        "Aggregate decode tokens/s:\n",
        "| streams | " + " | ".join(roles) + " | " + " | ".join(k.replace("_over_", " / ") for k in ratio_keys) + " |",
        "|---|" + "---|" * (len(roles) + len(ratio_keys)),
    ]
    for row in rows:
        out.append(f"| {row['streams']} | " + " | ".join(
            f"{row[f'{r}_aggregate_decode_tokens_per_s']:.1f}" for r in roles) + " | " + " | ".join(
            f"{row[k]:.2f}x" for k in ratio_keys) + " |")
    out += ["", "Start-up of all N streams (s: llama.cpp evaluates the prompt once and copies its cache, the "
            "engine prefills each of the N prompts; not like work), the first decode step included; state "
            "held at the end of warm-up (MB); whether every stream generated the same tokens:", "",
            "| streams | role | prefill + first step (s) | state (MB) | streams agree |", "|---|---|---|---|---|"]
    for row in rows:
        for role in roles:
            out.append(f"| {row['streams']} | {role} | {row[f'{role}_prefill_and_first_step_s']:.1f} | "
                       f"{row[f'{role}_state_bytes'] / 1e6:.1f} | {row[f'{role}_streams_agree']} |")
    out += ["", "Goal (aggregate tokens/s, int8 against Q8_0):", "", *goals(result),
            "", f"Load average at start / end: {result['load_average_at_start']} / {result['load_average_at_end']} "
            "(2 cores shared with other work: ratios, not absolute rates, are the result)."]
    return "\n".join(out)

