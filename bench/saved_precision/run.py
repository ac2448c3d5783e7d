"""Models saved at a precision: bytes on disk, seconds to load, and what loads back.

A donor is converted (default: SmolLM2-135M from the data folder, `--mixer attention`: the donor's
own weights in xatl's model, so that the cross-entropy means something), saved in float32, then
written at fp32, bf16 and int8 by `xatl.serving.precision.save_at_precision` (what `xatl quantize`
and a job's `precision` run). Each folder is loaded as a user would, `AutoModelForCausalLM.from_pretrained`
after `import xatl`: its model.safetensors bytes, the load time (median of --rounds), whether the
loaded weights and logits equal the model converted in memory by `apply_precision`, and the
validation cross-entropy of each on the same blocks of TinyStories.

    python bench/saved_precision/run.py [--donor PATH] [--text PATH] [--mixer attention] [--blocks 8]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, write_results  # noqa: E402

import xatl  # noqa: E402
from xatl.data import TextBlocks  # noqa: E402
from xatl.eval import evaluate_loss  # noqa: E402
from xatl.quantization import use_int8_kernel  # noqa: E402
from xatl.serving.precision import PRECISIONS, apply_precision, model_precision, save_at_precision  # noqa: E402


def _data_dir() -> Path:
    return Path(os.environ.get("XATL_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--donor", default=str(_data_dir() / "smollm2-135m"))
    parser.add_argument("--text", default=str(_data_dir() / "tinystories_val_subset" / "tinystories_val.txt"))
    parser.add_argument("--mixer", default="attention")
    parser.add_argument("--blocks", type=int, default=8, help="validation blocks of --block-size tokens")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="loads of each folder (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fp32-source"
        conversion = xatl.convert(args.donor, mixer=args.mixer, transfer="xatl", dtype=torch.float32, out=source)
        reference = conversion.model.eval()
        blocks = list(TextBlocks([args.text], conversion.tokenizer, args.block_size, keep_partial=False))
        blocks = blocks[: args.blocks]
        rows = []
        for precision in PRECISIONS:
            in_memory = apply_precision(copy.deepcopy(reference), precision)
            folder = save_at_precision(source, Path(tmp) / precision, precision)
            seconds, loaded = [], None
            for _ in range(args.rounds):
                start = time.perf_counter()
                loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
                seconds.append(time.perf_counter() - start)
            expected, got = in_memory.state_dict(), loaded.state_dict()
            same_weights = expected.keys() == got.keys() and all(
                expected[k].dtype == got[k].dtype and torch.equal(expected[k], got[k]) for k in expected)
            with torch.no_grad():
                same_logits = torch.equal(in_memory(blocks[0][None]).logits, loaded(blocks[0][None]).logits)
            rows.append({
                "precision": precision, "loaded_as": model_precision(loaded),
                "safetensors_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                "load_s": statistics.median(seconds), "weights_equal_in_memory": same_weights,
                "logits_equal_in_memory": same_logits,
                "valid_ce": evaluate_loss(loaded, blocks, batch_size=4).loss,
            })
            if precision == "int8":
                rows[-1]["int8_kernel"] = loaded.lm_head.kernel
                # the same weights on torch's kernel (bfloat16 activations inside the products)
                use_int8_kernel(loaded, "torch")
                rows[-1]["valid_ce_torch_kernel"] = evaluate_loss(loaded, blocks, batch_size=4).loss
                # the weights' share of the loss: int8 weights, float32 activations
                rows[-1]["valid_ce_dequantized"] = evaluate_loss(apply_precision(loaded, "fp32"), blocks,
                                                                 batch_size=4).loss
            print(rows[-1], flush=True)
            del in_memory, loaded
    fp32 = rows[0]
    for row in rows:
        row["bytes_vs_fp32"] = row["safetensors_bytes"] / fp32["safetensors_bytes"]
        row["ce_vs_fp32"] = row["valid_ce"] / fp32["valid_ce"] - 1
        for key in ("dequantized", "torch_kernel"):
            if f"valid_ce_{key}" in row:
                row[f"ce_{key}_vs_fp32"] = row[f"valid_ce_{key}"] / fp32["valid_ce"] - 1
    result = {"donor": args.donor, "mixer": args.mixer, "text": args.text, "blocks": len(blocks),
              "block_size": args.block_size, "rounds": args.rounds, "rows": rows, "environment": environment()}
    print(f"wrote {write_results('saved_precision', result, _markdown(result))}")


def _markdown(result: dict) -> str:
    lines = [
        "# Models saved at a precision", "",
        f"`{Path(result['donor']).name}` converted with `--mixer {result['mixer']}` (transfer `xatl`), saved in "
        "float32, then written at each precision by `save_at_precision` (`xatl quantize`, a job's `precision`) "
        "and loaded back with `AutoModelForCausalLM.from_pretrained` after `import xatl`. int8: every linear layer "
        "stored as int8 with a float32 scale per row (`quantization_config` in config.json); the embedding, norms "
        "and the rest stay float32. \"Equal\": the loaded folder's state dict (int8 weights and scales included) "
        "and logits bit for bit those of the model converted in memory by `apply_precision`. Cross-entropy: "
        f"{result['blocks']} blocks of {result['block_size']} tokens of TinyStories validation, the same for each; "
        f"load time: median of {result['rounds']} loads.", "",
        "| precision | loads as | model.safetensors | vs fp32 | load (s) | weights equal | logits equal "
        "| valid CE (nats/token) | vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['precision']} | {r['loaded_as']} | {r['safetensors_bytes'] / 2**20:.1f} MiB | "
                     f"{r['bytes_vs_fp32']:.2f}x | {r['load_s']:.2f} | {r['weights_equal_in_memory']} | "
                     f"{r['logits_equal_in_memory']} | {r['valid_ce']:.4f} | {r['ce_vs_fp32']:+.2%} |")
    int8 = next(r for r in result["rows"] if r["precision"] == "int8")
    lines += ["", f"The int8 row multiplies with `Int8Linear`'s kernel `{int8['int8_kernel']}` (xatl: activations "
              "quantised to int8 in blocks of 32 inside each product, `torch.ops.xatl.int8_linear`). The same folder "
              f"on torch's kernel (`use_int8_kernel(model, \"torch\")`, bfloat16 activations): valid CE "
              f"{int8['valid_ce_torch_kernel']:.4f} ({int8['ce_torch_kernel_vs_fp32']:+.2%}); its weights dequantised "
              f"to float32 (float32 activations, `apply_precision(model, \"fp32\")`): "
              f"{int8['valid_ce_dequantized']:.4f} ({int8['ce_dequantized_vs_fp32']:+.2%}), what the int8 weights "
              "as stored cost. With torch's dynamic int8 activations instead (one scale per input tensor), used "
              "before commit 93a7ebc, the int8 row measured +66.89% (valid CE 3.6453)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
