"""llama.cpp beside our engine in one run (issue 16): one stream, one thread, greedy decode after a
prompt that fills the context.

What a user would run instead of us on a CPU is llama.cpp serving the donor. The model is
`run.py`'s `random-width512` (a random-weight 66M Llama: width 512, 8 layers, 32,000-token vocabulary):

- its attention donor is written as GGUF at F16 and Q8_0 with the `gguf` package (llama.cpp's
  tensor names and metadata; q/k rows permuted from rotate-half to llama.cpp's interleaved RoPE as
  llama.cpp's converter does; norms stay F32), into a temporary folder;
- llama.cpp (llama-cpp-python, the `bench` extra) serves each file with `n_threads=1`, flash
  attention on, a context sized to the prompt and the steps; the prompt is really evaluated;
- our engine serves the converted model (GLA) at fp32, bf16 and int8 weights and the donor at fp32,
  torch with one thread, the whole prompt prefilled at admission.

At each context every side is prefilled with the same random prompt, then their decode steps are
timed in alternating blocks (`run.interleaved_decode`); decode tokens/s = 1 / the median step time
(the tokens after the first). The ratios xatl int8 / llama.cpp Q8_0 and xatl bf16 / llama.cpp F16
are checked against the issue's goals. Results go to results/generation/llamacpp/<cpu capability>.

With `--streams 16,64`: N concurrent streams at `--stream-context` tokens, llama.cpp's parallel
slots against our continuous batching, aggregate decode tokens/s (`llamacpp_streams.py`); results
go to results/generation/llamacpp/<cpu capability>/streams.

    pip install -e ".[bench]"   # compiles llama.cpp (minutes)
    python bench/generation/llamacpp.py --contexts 512,2048,8192
    python bench/generation/llamacpp.py --contexts '' --streams 16,64 --stream-context 4096
    python bench/generation/llamacpp.py --quick   # smoke check of the streams part (~2 min), writes nothing
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import by_cpu_capability, environment, write_results  # noqa: E402
from run import (  # noqa: E402 (bench/generation)
    interleaved_decode,
    random_prompt,
    random_width512,
    warm_up,
    weight_bytes_read_per_step,
)

import xatl  # noqa: E402
from xatl.kernels import kernel_path, load_kernels  # noqa: E402
from xatl.serving import Engine  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")
FILE_TYPES = {"F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# canonical (Hugging Face Llama) names -> llama.cpp's
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "mixer.q_proj.weight": "attn_q.weight",
               "mixer.k_proj.weight": "attn_k.weight", "mixer.v_proj.weight": "attn_v.weight",
               "mixer.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight"}
NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}


# ---- the donor as GGUF ----------------------------------------------------------------------------


def gguf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    _, _, layer, rest = name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half rows (first halves, then second halves of each head) -> llama.cpp's interleaved
    pairs, as llama.cpp's `convert_hf_to_gguf.py` permutes q/k."""
    # (heads, 2 halves, head_dim / 2, in) -> (heads, head_dim / 2, 2, in)
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def vocabulary(size: int) -> tuple[list[str], list[int]]:
    """A SentencePiece-style vocabulary of Llama's layout (unk, bos, eos, the 256 byte tokens, then
    words): the benchmark feeds token ids, so only the size and the special tokens matter."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"w{i}" for i in range(len(tokens), size)]
    types += [gguf.TokenType.NORMAL] * (size - len(types))
    return tokens, [int(t) for t in types]


def write_gguf(model: xatl.XatlForCausalLM, path: Path, file_type: str) -> int:
    """Write the attention model `model` as a llama.cpp GGUF at `file_type`; return the bytes of
    weights one decode step reads (all tensors, of the token embedding one row)."""
    config = model.config
    tensor_type, llama_file_type = FILE_TYPES[file_type]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"xatl random-width512 donor {file_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(llama_file_type)
    tokens, types = vocabulary(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    read = 0
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            array = interleave_rope_rows(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = interleave_rope_rows(array, config.num_key_value_heads)
        if array.ndim == 1:  # norms stay F32, as llama.cpp's converter keeps them
            writer.add_tensor(gguf_name(name), array)
            stored = array.nbytes
        elif tensor_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
            stored = array.size * 2
        else:
            quantised = gguf.quants.quantize(array, tensor_type)
            writer.add_tensor(gguf_name(name), quantised, raw_dtype=tensor_type)
            stored = quantised.nbytes
        read += stored // array.shape[0] if name == "model.embed_tokens.weight" else stored
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read


# ---- llama.cpp behind the calls interleaved_decode makes ---------------------------------------------


class LlamaCpp:
    """One llama.cpp context serving one greedy stream through `submit`, `step` and `stats`, the calls
    `run.interleaved_decode` makes of an `Engine`: the first step evaluates the whole prompt and
    the first generated token, every later step one token."""

    def __init__(self, path: Path, context: int, threads: int, config: xatl.XatlConfig):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, flash_attn=True, verbose=False)
        self.vocab = self.llm.n_vocab()
        # f16 keys and values of every layer, per token in the cache
        self.cache_bytes_per_token = 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        self.stream = None

    def submit(self, prompt: list[int], params=None) -> SimpleNamespace:
        self.llm.reset()  # the next eval drops the cache past position 0
        self.prompt = list(prompt)
        self.stream = SimpleNamespace(cancelled=False)
        self.stream.cancel = lambda: setattr(self.stream, "cancelled", True)
        return self.stream

    def greedy(self) -> int:
        return int(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,)).argmax())

    def step(self) -> bool:
        if self.stream is None:
            return False
        if self.stream.cancelled:
            self.stream = None
            self.llm.reset()
            return False
        if self.prompt is not None:
            self.llm.eval(self.prompt)
            self.prompt, self.token = None, self.greedy()
        self.llm.eval([self.token])
        self.token = self.greedy()
        return True

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(state_bytes=self.cache_bytes_per_token * self.llm.n_tokens)

    def close(self) -> None:
        self.llm.close()


def llamacpp_versions() -> dict:
    import llama_cpp

    return {"llama_cpp_python": llama_cpp.__version__, "gguf": metadata.version("gguf"),
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip()}


# ---- the run ------------------------------------------------------------------------------------


def agreement(donor: xatl.XatlForCausalLM, files: dict[str, Path], args) -> dict:
    """The GGUF files serve the donor: the last logits of a short prompt, llama.cpp against ours."""
    prompt = random_prompt(64, donor.config.vocab_size, seed=7)
    with torch.inference_mode():
        ours = donor(torch.tensor([prompt])).logits[0, -1].float().numpy()
    result = {}
    for file_type, path in files.items():
        server = LlamaCpp(path, 256, args.threads, donor.config)
        server.llm.eval(prompt)
        theirs = np.ctypeslib.as_array(server.llm._ctx.get_logits(), shape=(server.vocab,)).copy()
        server.close()
        result[file_type] = {"max_abs_logit_difference": float(np.abs(theirs - ours).max()),
                             "logit_scale": float(np.abs(ours).max()),
                             "same_greedy_token": bool(theirs.argmax() == ours.argmax())}
    return result


def measure(args, result: dict, save) -> None:
    """Fill `result`, calling `save()` after each context: a long run interrupted keeps what it measured."""
    size = random_width512(args)
    vocab, config = size.donor.config.vocab_size, size.donor.config
    # as the service runs them (compile="auto"; warm_up waits for the compiled steps); the whole prompt
    # prefilled at admission
    ours = {f"xatl_{p}": Engine(copy.deepcopy(size.converted), size.tokenizer, background=False, precision=p,
                                prefill_chunk=None, compile="auto") for p in PRECISIONS}
    ours["xatl_donor_fp32"] = Engine(size.donor, size.tokenizer, background=False, prefill_chunk=None)
    for engine in ours.values():
        warm_up(engine, vocab)
    result["compiled"] = [role for role, engine in ours.items() if engine.stats().decode_step == "compiled"]
    result["kernels"] = ({p: f"xatl's (`torch.ops.xatl.{p}_linear`, {kernel_path(p)} path)" for p in ("int8", "bf16")}
                         if load_kernels() else {"int8": "torch's `_weight_int8pack_mm` (bfloat16 activations)",
                                                 "bf16": "torch's linear"})
    result.update(weight_bytes_read_per_step={role: weight_bytes_read_per_step(e.model) for role, e in ours.items()},
                  contexts=[])
    with tempfile.TemporaryDirectory() as folder:
        files = {t: Path(folder) / f"donor-{t}.gguf" for t in FILE_TYPES}
        for file_type, path in files.items():
            result["weight_bytes_read_per_step"][f"llamacpp_{file_type}"] = write_gguf(size.donor, path, file_type)
        result["agreement_with_donor"] = agreement(size.donor, files, args)
        print(f"GGUF against our donor: {result['agreement_with_donor']}", flush=True)
        steps = 2 + args.warmup_steps + args.rounds * args.block + 2 * 6  # + warm-up's requests
        for context in args.contexts:
            n_ctx = -(-(context + steps) // 256) * 256
            servers = {f"llamacpp_{t}": LlamaCpp(p, n_ctx, args.threads, config) for t, p in files.items()}
            for server in servers.values():
                warm_up_llamacpp(server, vocab)
            engines = {**servers, **ours}
            measured = interleaved_decode(engines, random_prompt(context, vocab, seed=context), args)
            for server in servers.values():
                server.close()
            rate = {role: m["decode_tokens_per_s"] for role, m in measured.items()}
            row = {"context": context, "llamacpp_n_ctx": n_ctx, **{
                f"{role}_{key}": value for role, m in measured.items() for key, value in m.items()},
                "xatl_int8_over_llamacpp_Q8_0": rate["xatl_int8"] / rate["llamacpp_Q8_0"],
                "xatl_bf16_over_llamacpp_F16": rate["xatl_bf16"] / rate["llamacpp_F16"],
                "xatl_fp32_over_llamacpp_F16": rate["xatl_fp32"] / rate["llamacpp_F16"],
                "xatl_donor_fp32_over_llamacpp_F16": rate["xatl_donor_fp32"] / rate["llamacpp_F16"]}
            result["contexts"].append(row)
            print(f"context {context:6d}: " + ", ".join(f"{r} {v:.1f}" for r, v in rate.items())
                  + f" tok/s; int8/Q8_0 {row['xatl_int8_over_llamacpp_Q8_0']:.2f}x, "
                  f"bf16/F16 {row['xatl_bf16_over_llamacpp_F16']:.2f}x", flush=True)
            save()


def warm_up_llamacpp(server: LlamaCpp, vocab: int) -> None:
    for length in (16, 24):
        server.submit(random_prompt(length, vocab, seed=length))
        for _ in range(6):
            server.step()
        server.stream.cancel()
        server.step()


# ---- the report -----------------------------------------------------------------------------------


ROLES = ["llamacpp_F16", "llamacpp_Q8_0", "xatl_fp32", "xatl_bf16", "xatl_int8", "xatl_donor_fp32"]


def goals(rows: list[dict]) -> list[str]:
    """The issue's one-stream goals, met or missed, by how much."""
    lines = []
    for row in rows:
        context, int8, bf16 = row["context"], row["xatl_int8_over_llamacpp_Q8_0"], row["xatl_bf16_over_llamacpp_F16"]
        if context >= 2048:
            lines.append(f"- {context:,}: int8 ≥ Q8_0: {'met' if int8 >= 1 else 'missed'} ({int8:.2f}x); "
                         f"bf16 ≥ F16: {'met' if bf16 >= 1 else 'missed'} ({bf16:.2f}x)")
        if context >= 16384:
            lines.append(f"- {context:,}: int8 ≥ 3x Q8_0: {'met' if int8 >= 3 else 'missed'} ({int8:.2f}x)")
    return lines


def markdown(result: dict) -> str:
    rows = result["contexts"]
    out = [
        "# llama.cpp beside xatl: one stream, one thread (issue 16)\n",
        "random-width512 (random-weight 66M Llama; converted: GLA). llama.cpp serves the donor from GGUF "
        "(F16, Q8_0; flash attention, n_threads=1); xatl serves the converted model at fp32/bf16/int8 "
        f"weights (int8: activations quantised in blocks of 32 inside the products by {result['kernels']['int8']} "
        f"kernel; bf16 products by {result['kernels']['bf16']}; "
        "decode steps compiled where `XATL_COMPILE=auto` compiles them here: "
        f"{', '.join(result['compiled']) or 'none'}) "
        "and the donor at fp32. Decode tokens/s after a prompt of `context` tokens "
        "(1 / median step, steps of all six interleaved in blocks).\n",
        f"Versions: llama-cpp-python {result['versions']['llama_cpp_python']}, gguf "
        f"{result['versions']['gguf']}. llama.cpp: `{result['versions']['llama_cpp_system_info']}`\n",
        "| context | llama.cpp F16 | llama.cpp Q8_0 | xatl GLA fp32 | xatl GLA bf16 | xatl GLA int8 | xatl donor fp32 "
        "| int8 / Q8_0 | bf16 / F16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        out.append(f"| {row['context']:,} | " + " | ".join(f"{row[f'{r}_decode_tokens_per_s']:.1f}" for r in ROLES)
                   + f" | {row['xatl_int8_over_llamacpp_Q8_0']:.2f}x | {row['xatl_bf16_over_llamacpp_F16']:.2f}x |")
    out += ["", "Prefill + first decode step (s):", "",
            "| context | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for row in rows:
        out.append(f"| {row['context']:,} | "
                   + " | ".join(f"{row[f'{r}_prefill_and_first_step_s']:.2f}" for r in ROLES) + " |")
    out += ["", "Weight bytes read per decode step: " + ", ".join(
        f"{r} {b / 1e6:.1f} MB" for r, b in result["weight_bytes_read_per_step"].items()) + ".", "",
        "GGUF against our donor (last logits of a 64-token prompt): " + ", ".join(
            f"{t}: max |Δlogit| {a['max_abs_logit_difference']:.2e} (logits up to {a['logit_scale']:.2e}), "
            f"same greedy token {a['same_greedy_token']}" for t, a in result["agreement_with_donor"].items()) + ".",
        "", "Goals (one stream, one thread):", "", *goals(rows),
        "", f"Load average at start / end: {result['load_average_at_start']} / {result['load_average_at_end']} "
        "(2 cores shared with other work: ratios, not absolute rates, are the result).", "",
        "Concurrent streams (llama.cpp's parallel slots against our continuous batching, `--streams`): "
        "[streams/README.md](streams/README.md)."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731 ("" -> none)
    names = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--contexts", default="512,2048,8192", type=ints, help="one-stream contexts ('': none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixer", default="gla", help="mixer of the converted model")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks of decode steps per context")
    parser.add_argument("--block", type=int, default=4, help="decode steps per block")
    parser.add_argument("--streams", default="", type=ints,
                        help="e.g. 16,64: concurrent streams (llamacpp_streams.py), results to .../llamacpp/streams")
    parser.add_argument("--stream-context", type=int, default=4096, help="prompt tokens of every concurrent stream")
    parser.add_argument("--stream-precisions", default="int8,bf16", type=names, help=f"xatl's, of {PRECISIONS}")
    parser.add_argument("--stream-file-types", default="Q8_0,F16", type=names,
                        help=f"llama.cpp's, of {tuple(FILE_TYPES)}")
    parser.add_argument("--stream-kv", default="split", type=names,
                        help="llama.cpp cache layouts: split (the server's for -np N), unified, or both")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check of the streams part: 2 and 4 streams at 256 tokens; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.streams, args.stream_context = [], [2, 4], 256
        args.warmup_steps, args.rounds, args.block = 1, 2, 2
    for value, allowed, option in ((args.stream_precisions, PRECISIONS, "--stream-precisions"),
                                   (args.stream_file_types, FILE_TYPES, "--stream-file-types"),
                                   (args.stream_kv, ("split", "unified"), "--stream-kv")):
        if not set(value) <= set(allowed):
            parser.error(f"{option}: {value} not all of {tuple(allowed)}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.contexts:
        one_stream(args)
    if args.streams:
        streams(args)


def one_stream(args) -> None:
    result = {"settings": dict(vars(args)), "load_average_at_start": os.getloadavg(),
              "versions": llamacpp_versions()}

    def save() -> None:
        result["load_average_at_end"] = os.getloadavg()
        result["environment"] = environment()
        print(f"wrote {write_results(by_cpu_capability('generation/llamacpp'), result, markdown(result))}", flush=True)

    measure(args, result, save)


def streams(args) -> None:
    import llamacpp_streams  # bench/generation; it imports this module

    result = {"settings": dict(vars(args)), "load_average_at_start": os.getloadavg(),
              "versions": llamacpp_versions()}

    def save() -> None:
        result["load_average_at_end"] = os.getloadavg()
        result["environment"] = environment()
        if args.quick:
            print(llamacpp_streams.markdown(result), flush=True)
        else:
            name = by_cpu_capability("generation/llamacpp") + "/streams"
            folder = write_results(name, result, llamacpp_streams.markdown(result))
            print(f"wrote {folder}", flush=True)

    llamacpp_streams.measure_streams(args, result, save)

if __name__ == "__main__":
    main()
