"""The job spec: one JSON-able shape shared by the REST body, the store, the worker and the CLI.

    {"type": "conversion", "donor": "file-…", "tokenizer": "file-…", "mixer": "gla",
     "training": {"training_file": "file-…", "steps": 400, "lr": 3e-3},
     "evaluation": {"contexts": [128, 512]}, "suffix": "stories"}

    {"type": "fine_tune", "model": "stories260K-gla", "training": {"training_file": "file-…", "tokens": 1000000},
     "precision": "int8"}

    {"type": "conversion", "donor": "file-…", "mixer": "gla", "stages": ["attention_transfer", "train"],
     "attention_transfer": {"tokens": 2000000, "lr": 3e-3}, "training": {"training_file": "file-…", "tokens": 1000000}}

Torch-free (the job routes import it). The names follow `xatl`: the conversion fields are
`xatl.convert`'s, the training fields `xatl.training.TrainConfig`'s plus the text's, the attention
transfer fields `xatl.training.attention_transfer.AttentionTransferConfig`'s, so a spec maps onto
`xatl.pipeline.PipelineSpec` field by field. A conversion's `stages` lists its training stages in
the order they run: `["train"]` (the default), `["attention_transfer", "train"]`, or
`["attention_transfer"]`. `precision` (fp32, bf16 or int8) is the published model's weights, as
saved and served (training runs in float; `xatl.serving.precision`). Unknown fields are errors.
Files are named by a file id (`file-…`, from POST /v1/files), an absolute path under the configured
import roots, or a Hugging Face hub id (`org/name`); see `worker.references`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# The library's names, kept here so that the job routes need not import torch (a test holds them equal).
MIXERS = ("mamba2", "mamba", "retention", "gla", "attention")
DEFAULT_MIXER = "mamba2"  # xatl.mixers.DEFAULT_MIXER
TRANSFERS = ("none", "embeddings-only", "xatl-no-oproj", "xatl", "xatl+qkv")
DEFAULT_TRANSFER = "xatl+qkv"  # xatl.transfer.DEFAULT_TRANSFER
_OPTIONS = r"(:[a-z_]+=[0-9.e+-]+(,[a-z_]+=[0-9.e+-]+)*)?"
FREEZE_PATTERN = rf"^(none|steps:\d+|lit{_OPTIONS}|norm-peak{_OPTIONS})$"
DISTILL = ("", "kl", "hidden", "kl,hidden", "hidden,kl")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
STAGES = ("attention_transfer", "train")  # a conversion's training stages, in the order they run
PRECISIONS = ("fp32", "bf16", "int8")  # xatl.serving.PRECISIONS: a published model's weights


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Budgeted(_Strict):
    """What the training and attention-transfer sections share: one budget (tokens or steps) and the
    text as one file or several."""

    def _check_budget_and_files(self) -> None:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("give exactly one budget: tokens or steps")
        if self.training_file and self.training_files:
            raise ValueError("give training_file or training_files, not both")

    @property
    def files(self) -> list[str]:
        return [self.training_file] if self.training_file else list(self.training_files or [])


class TrainingSpec(_Budgeted):
    """Continued training: the text, the budget and `xatl.training.TrainConfig`'s options."""

    training_file: str | None = Field(None, description="file id, path under an import root, or hub dataset")
    training_files: list[str] | None = Field(None, description="several training files")
    validation_file: str | None = Field(None, description="held-out text; default: valid_fraction of the training text")
    valid_fraction: float = Field(0.01, ge=0, lt=1, description="share of the training text held out (0: none)")
    split_by: Literal["document", "block"] = "document"
    text_field: str = Field("text", min_length=1, description="field of the text in .jsonl files")
    block_size: int = Field(512, ge=2, le=1 << 20)
    tokens: int | None = Field(None, ge=1, description="the budget in tokens (or steps)")
    steps: int | None = Field(None, ge=1, description="the budget in optimizer steps (or tokens)")
    batch_size: int = Field(8, ge=1, le=1 << 16)
    grad_accum: int = Field(1, ge=1, le=1 << 16)
    lr: float = Field(1e-3, gt=0, le=10)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    freeze: str = Field("none", pattern=FREEZE_PATTERN, description="none | steps:N | lit[:…] | norm-peak[:…]")
    freeze_initialised: bool = False
    transferred_lr_scale: float = Field(1.0, ge=0)
    unfreeze_warmup_steps: int = Field(0, ge=0)
    distill: str = Field("", description="'', 'kl', 'hidden' or 'kl,hidden' (from the donor)")
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(0.5, gt=0, le=1)
    hidden_weight: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs a GPU
    seed: int = Field(0, ge=0, lt=1 << 63)
    save_every: int = Field(50, ge=0, description="checkpoint every N steps (a resumed job loses at most N)")
    keep_checkpoints: int | None = Field(3, ge=1)
    eval_every: int = Field(0, ge=0)
    eval_batches: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1, description="a progress event every N steps")

    @field_validator("distill")
    @classmethod
    def _distill(cls, value: str) -> str:
        if value not in DISTILL:
            raise ValueError(f"must be one of {[d for d in DISTILL if d][:3]} or empty")
        return value

    @model_validator(mode="after")
    def _one_budget_and_text(self):
        self._check_budget_and_files()
        if not self.training_file and not self.training_files:
            raise ValueError("give training_file (or training_files)")
        return self

    def train_config(self) -> dict:
        """The `xatl.training.TrainConfig` fields."""
        names = ("batch_size", "grad_accum", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
                 "freeze", "transferred_lr_scale", "unfreeze_warmup_steps", "distill", "temperature", "kl_weight",
                 "hidden_weight", "precision", "seed", "save_every", "keep_checkpoints", "eval_every",
                 "eval_batches", "log_every")
        return {"max_tokens": self.tokens, "max_steps": self.steps, **{n: getattr(self, n) for n in names}}


TEXT_FIELDS = ("training_file", "training_files", "validation_file", "valid_fraction", "split_by", "text_field",
               "block_size")


class AttentionTransferSpec(_Budgeted):
    """Layer-wise attention transfer before end-to-end training: each converted layer's mixer learns
    its donor attention's output (`xatl.training.attention_transfer.AttentionTransferConfig`'s options).

    The text is the `training` section's unless this section names its own `training_file`; each text
    option left out (null) is the training's, or `TrainingSpec`'s default without a training section."""

    training_file: str | None = Field(None, description="default: the training section's text")
    training_files: list[str] | None = Field(None, description="several files (default: the training's)")
    validation_file: str | None = Field(None, description="held-out text (default: the training's)")
    valid_fraction: float | None = Field(None, ge=0, lt=1, description="share of the text held out (0: none)")
    split_by: Literal["document", "block"] | None = None
    text_field: str | None = Field(None, min_length=1, description="field of the text in .jsonl files")
    block_size: int | None = Field(None, ge=2, le=1 << 20)
    tokens: int | None = Field(None, ge=1, description="the budget in tokens (or steps)")
    steps: int | None = Field(None, ge=1, description="the budget in optimizer steps (or tokens)")
    layers: list[int] | None = Field(None, min_length=1, description="converted layers to train (default: all)")
    batch_size: int = Field(8, ge=1, le=1 << 16)
    grad_accum: int = Field(1, ge=1, le=1 << 16)
    lr: float = Field(1e-3, gt=0, le=10)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="per layer")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs a GPU
    seed: int = Field(0, ge=0, lt=1 << 63)
    save_every: int = Field(50, ge=0, description="checkpoint every N steps (a resumed job loses at most N)")
    keep_checkpoints: int | None = Field(3, ge=1)
    eval_every: int = Field(0, ge=0, description="score the held-out text every N steps (0: at the end)")
    eval_batches: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1, description="a progress event every N steps")

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (any(i < 0 for i in value) or len(set(value)) != len(value)):
            raise ValueError("layer indices must be distinct and non-negative")
        return sorted(value) if value is not None else None

    @model_validator(mode="after")
    def _one_budget(self):
        self._check_budget_and_files()
        return self

    def text(self, training: TrainingSpec | None) -> dict:
        """The text fields in effect: this section's file or the training's, each option this
        section's or else the training's (or the default)."""
        own = bool(self.files)
        defaults = {n: f.default for n, f in TrainingSpec.model_fields.items() if n in TEXT_FIELDS}
        fallback = training.model_dump(include=set(TEXT_FIELDS)) if training is not None else defaults
        text = {n: getattr(self, n) if getattr(self, n) is not None else fallback[n] for n in TEXT_FIELDS}
        if own:  # its own files, and only its own validation file
            text.update(training_file=self.training_file, training_files=self.training_files,
                        validation_file=self.validation_file)
        return text

    def attention_transfer_config(self) -> dict:
        """The `xatl.training.attention_transfer.AttentionTransferConfig` fields."""
        names = ("layers", "batch_size", "grad_accum", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
                 "grad_clip", "precision", "seed", "save_every", "keep_checkpoints", "eval_every", "eval_batches",
                 "log_every")
        return {"max_tokens": self.tokens, "max_steps": self.steps, **{n: getattr(self, n) for n in names}}


class EvaluationSpec(_Strict):
    """What a finished job measures: validation loss beside the donor's, the decode profile, lm-eval."""

    validation_file: str | None = Field(None, description="default: the training's validation text")
    max_batches: int | None = Field(50, ge=1, description="at most this many batches of validation text")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness task names")
    lm_eval_limit: int | None = Field(None, ge=1, description="examples per lm-eval task")
    contexts: list[int] = Field(default_factory=lambda: [128, 512], max_length=8,
                                description="prompt lengths of the decode profile")
    decode_tokens: int = Field(32, ge=2, le=4096)

    @field_validator("contexts")
    @classmethod
    def _contexts(cls, value: list[int]) -> list[int]:
        if any(not 1 <= c <= 1 << 20 for c in value):
            raise ValueError("each context must be between 1 and 1048576 tokens")
        return value


class _JobBase(_Strict):
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    name: str | None = Field(None, pattern=NAME_PATTERN, description="the resulting model's name")
    suffix: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,40}$", description="added to the default name")
    gpus: int | None = Field(None, ge=0, le=64, description="GPUs to train on (0: CPU; >1: data-parallel)")
    precision: Literal[PRECISIONS] = Field("fp32", description="the published model's weights, as it is saved and "
                                           "served: fp32, bf16, or int8 (int8 linear layers; served on the CPU). "
                                           "Training runs in float either way")


class ConversionJob(_JobBase):
    type: Literal["conversion"]
    donor: str = Field(min_length=1, description="file id, path under an import root, or Hugging Face hub id")
    tokenizer: str | None = Field(None, description="a llama2.c donor's tokenizer .bin (file id or path)")
    mixer: Literal[MIXERS] = DEFAULT_MIXER
    attention_layers: list[int] = Field(default_factory=list, description="layers that keep attention")
    transfer: Literal[TRANSFERS] = DEFAULT_TRANSFER
    mixer_options: dict[str, int | float | str | bool] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, lt=1 << 63, description="seed of what is not transferred")
    training: TrainingSpec | None = None
    stages: list[str] = Field(default_factory=lambda: ["train"], validate_default=True,
                              description="training stages in order: 'attention_transfer', 'train' "
                                          "(default: ['train'] with a training section, [] without)")
    attention_transfer: AttentionTransferSpec | None = Field(None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _default_stages(cls, data):
        if isinstance(data, dict) and "stages" not in data and data.get("training") is None:
            return {**data, "stages": []}  # a conversion alone
        return data

    @field_validator("attention_layers")
    @classmethod
    def _layers(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value) or len(set(value)) != len(value):
            raise ValueError("layer indices must be distinct and non-negative")
        return sorted(value)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[str], info: ValidationInfo) -> list[str]:
        unknown = [s for s in value if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}: the stages are {list(STAGES)}")
        if len(set(value)) != len(value) or value != sorted(value, key=STAGES.index):
            raise ValueError(f"each stage at most once, in the order {list(STAGES)}")
        if "train" in value and info.data.get("training") is None:
            raise ValueError("the 'train' stage needs a training section")
        if not value and info.data.get("training") is not None:
            raise ValueError("a training section is given but no stage uses it (add 'train')")
        if "attention_transfer" in value:
            mixer, transfer = info.data.get("mixer"), info.data.get("transfer")
            if mixer == "attention":
                raise ValueError("attention transfer trains converted layers, and mixer 'attention' converts none")
            if (info.data.get("gpus") or 0) > 1:
                raise ValueError("attention transfer runs in one process: give gpus 0 or 1")
            if transfer in ("none", "embeddings-only"):
                raise ValueError(f"attention transfer needs the donor's weights around each mixer, and transfer "
                                 f"{transfer!r} does not copy them (use 'xatl' or 'xatl+qkv')")
        return value

    @field_validator("attention_transfer")
    @classmethod
    def _attention_transfer(cls, value: AttentionTransferSpec | None, info: ValidationInfo):
        stages = info.data.get("stages")
        if stages is None:  # the stages are wrong already; that error is the one to report
            return value
        if value is None:
            if "attention_transfer" in stages:
                raise ValueError("the 'attention_transfer' stage needs this section (its budget: tokens or steps)")
            return value
        if "attention_transfer" not in stages:
            raise ValueError("given, but 'attention_transfer' is not in stages "
                             "(e.g. [\"attention_transfer\", \"train\"])")
        if not value.files and info.data.get("training") is None:
            raise ValueError("give training_file here, or a training section whose text it uses")
        kept = set(value.layers or ()) & set(info.data.get("attention_layers") or ())
        if kept:
            raise ValueError(f"layers {sorted(kept)} keep attention (attention_layers): only converted layers train")
        return value


class FineTuneJob(_JobBase):
    type: Literal["fine_tune"]
    model: str = Field(pattern=NAME_PATTERN, description="a model the service serves")
    training: TrainingSpec


JobSpec = Annotated[ConversionJob | FineTuneJob, Field(discriminator="type")]


def default_model_name(spec: ConversionJob | FineTuneJob, job_id: str, donor_name: str | None = None) -> str:
    """`<donor>-<mixer>[-<suffix>]-<short id>` for a conversion, `<model>-ft[-<suffix>]-<short id>` for
    a fine-tune; `name` when the spec gives one."""
    if spec.name:
        return spec.name
    short = job_id.split("-")[-1][:8]
    if isinstance(spec, ConversionJob):
        base = re.sub(r"[^A-Za-z0-9._-]", "-", (donor_name or "model").split("/")[-1])
        base = re.sub(r"(\.tar)?\.(bin|gguf|tar|zip|tgz|gz|safetensors)$", "", base) or "model"
        parts = [base, spec.mixer]
    else:
        parts = [spec.model, "ft"]
    if spec.suffix:
        parts.append(spec.suffix)
    return "-".join([*parts, short])[:96].strip("-.")


__all__ = ["DEFAULT_MIXER", "DEFAULT_TRANSFER", "MIXERS", "PRECISIONS", "STAGES", "TEXT_FIELDS", "TRANSFERS",
           "AttentionTransferSpec", "ConversionJob", "EvaluationSpec", "FineTuneJob", "JobSpec", "TrainingSpec",
           "default_model_name"]
