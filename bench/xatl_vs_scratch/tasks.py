"""The two donors of the reproduction and their text, prepared once and cached.

- `stories260K`: llama2.c's pretrained TinyStories model with the TinyStories validation subset:
  blocks 0–399 are the validation text, the rest training. Tokenised as in
  ../shared/notes/xatl-at-tiny-scale.md: one BOS, blocks joined by a newline, no dummy-prefix
  space per block; scored in windows of 256 predicted tokens.
- `gutenberg`: a transformers Llama of about a million parameters (a few million with `--scale gpu`)
  that this benchmark pretrains on the 14 training books of gutenberg_mini, with a byte-level BPE
  trained on the same books; the 3 held-out books are the validation text. Cached under
  bench/.cache/, keyed by its settings.

A task is saved as tensors (`train.pt`: blocks of `block_size` tokens; `valid.pt`: windows of
`eval_window + 1` tokens) so that the worker processes load it instead of tokenising again. Its
paths are relative to the repository root (results name no path of the machine that wrote them).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xatl.data import TextBlocks, pack_blocks
from xatl.donors import Donor, load_donor

ROOT = Path(__file__).resolve().parents[2]  # the repository
CACHE = ROOT / "bench" / ".cache" / "xatl_vs_scratch"


def relative(path: str | Path) -> str:
    """`path` relative to the repository root, as results and cached specs record it."""
    return os.path.relpath(Path(path).resolve(), ROOT)


@dataclass
class Task:
    name: str
    donor_source: str  # what `load_donor` reads, relative to the repository root
    donor_tokenizer: str | None  # relative to the repository root
    folder: str  # train.pt, valid.pt, donor.json; relative to the repository root
    num_layers: int

    @property
    def path(self) -> Path:
        return ROOT / self.folder

    def load_donor(self) -> Donor:
        tokenizer = self.donor_tokenizer and str(ROOT / self.donor_tokenizer)
        return load_donor(str(ROOT / self.donor_source), tokenizer=tokenizer)

    def blocks(self, split: str) -> list[torch.Tensor]:
        return list(torch.load(self.path / f"{split}.pt", weights_only=True))

    def donor_loss(self) -> float:
        return json.loads((self.path / "donor.json").read_text())["loss"]


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _save_blocks(folder: Path, train: list[torch.Tensor], valid: list[torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torch.stack(train), folder / "train.pt")
    torch.save(valid, folder / "valid.pt")  # a list: the last window is shorter


def _donor_loss(task: Task, log) -> None:
    """The donor's own validation loss (the ceiling), scored as every variant is."""
    from xatl.convert import convert
    from xatl.eval import evaluate_loss

    teacher = convert(task.load_donor(), mixer="attention", transfer="xatl").model.float()
    result = evaluate_loss(teacher, task.blocks("valid"), batch_size=16)
    (task.path / "donor.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    log(f"{task.name}: donor validation loss {result.loss:.4f} over {result.tokens:,} tokens")


# -- stories260K on TinyStories -----------------------------------------------------------------

def stories_task(data_dir: Path, settings: dict, log) -> Task:
    donor = data_dir / "stories260K" / "stories260K.bin"
    tokenizer = data_dir / "stories260K" / "tok512.bin"
    text_file = data_dir / "tinystories_val_subset" / "tinystories_val.txt"
    for path in (donor, tokenizer, text_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
    wanted = {k: settings[k] for k in ("block_size", "eval_window", "valid_stories")}
    folder = CACHE / f"stories-{_key(wanted)}"
    task = Task("stories260K", relative(donor), relative(tokenizer), relative(folder), num_layers=5)
    if (folder / "donor.json").is_file():
        return task

    tok = load_donor(str(donor), tokenizer=str(tokenizer)).tokenizer
    text = text_file.read_text(encoding="utf-8")
    stories = [b.strip() for b in text.split("\n\n") if b.strip()]
    split = settings["valid_stories"]

    def stream(blocks: list[str]) -> list[int]:
        # one BOS, stories joined by "\n" (byte token 13): the tokenizer adds its dummy-prefix
        # space only at the very start, as the notes require
        return [tok.bos_token_id, *tok("\n".join(blocks), add_special_tokens=False)["input_ids"]]

    train = [torch.tensor(b) for b in pack_blocks([stream(stories[split:])], settings["block_size"])]
    valid = [torch.tensor(b) for b in pack_blocks([stream(stories[:split])], settings["eval_window"] + 1,
                                                  keep_partial=True)]
    _save_blocks(folder, train, valid)
    log(f"stories260K: {len(train)} training blocks of {settings['block_size']}, "
        f"{sum(len(v) - 1 for v in valid):,} validation tokens")
    _donor_loss(task, log)
    return task


# -- a donor pretrained here on Gutenberg books ------------------------------------------------------

def gutenberg_task(data_dir: Path, settings: dict, log) -> Task:
    books = data_dir / "gutenberg_mini"
    train_books = sorted((books / "train").glob("*.txt"))
    valid_books = sorted((books / "valid").glob("*.txt"))
    if len(train_books) != 14 or len(valid_books) != 3:
        raise FileNotFoundError(f"{books} should hold 14 training and 3 validation books")
    donor_settings = settings["donor"]
    wanted = {k: settings[k] for k in ("block_size", "eval_window", "valid_windows")} | donor_settings
    folder = CACHE / f"gutenberg-{_key(wanted)}"
    donor_dir = folder / "donor"
    task = Task("gutenberg", relative(donor_dir), None, relative(folder),
                num_layers=donor_settings["num_hidden_layers"])
    if (folder / "donor.json").is_file():
        return task

    tokenizer = _train_tokenizer(train_books, donor_settings["vocab_size"])
    train = list(TextBlocks(train_books, tokenizer, settings["block_size"]))
    all_valid = list(TextBlocks(valid_books, tokenizer, settings["eval_window"] + 1, keep_partial=True))
    # an evenly spaced subset of the held-out windows keeps each evaluation short
    stride = max(1, len(all_valid) // settings["valid_windows"])
    valid = all_valid[::stride][: settings["valid_windows"]]
    _save_blocks(folder, train, valid)
    log(f"gutenberg: {len(train)} training blocks of {settings['block_size']}, "
        f"{sum(len(v) - 1 for v in valid):,} validation tokens (of {sum(len(v) - 1 for v in all_valid):,})")
    _pretrain_donor(donor_dir, tokenizer, train, valid, donor_settings, settings, log)
    _donor_loss(task, log)
    return task


def _train_tokenizer(books: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator((p.read_text(encoding="utf-8") for p in books), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _pretrain_donor(out: Path, tokenizer, train, valid, donor: dict, settings: dict, log) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from xatl.training import TrainConfig
    from xatl.training import train as train_model

    config = LlamaConfig(
        **{k: v for k, v in donor.items() if k not in ("steps", "batch_size", "lr", "warmup_steps")},
        num_key_value_heads=donor["num_attention_heads"], max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(settings["seed"])
    model = LlamaForCausalLM(config).to(settings["device"])
    parameters = sum(p.numel() for p in model.parameters())
    log(f"gutenberg: pretraining a {parameters:,}-parameter Llama for {donor['steps']} steps")
    start = time.perf_counter()
    result = train_model(
        model, train,
        TrainConfig(max_steps=donor["steps"], batch_size=donor["batch_size"], lr=donor["lr"],
                    warmup_steps=donor["warmup_steps"], weight_decay=0.1, seed=settings["seed"], log_every=50),
        valid_blocks=valid, out_dir=out, tokenizer=tokenizer,  # the model and tokenizer land in `out`
        on_step=lambda e: e["event"] == "train" and log(f"  donor step {e['step']}: loss {e['loss']:.3f}"),
    )
    (out / "pretraining.json").write_text(json.dumps(
        {"parameters": parameters, "steps": result.step, "tokens": result.tokens, "valid_loss": result.valid_loss,
         "seconds": time.perf_counter() - start, "config": config.to_dict()}, indent=1) + "\n")
