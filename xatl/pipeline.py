"""A job from start to a published model: convert → attention transfer → train → evaluate → profile
→ publish.

    run_pipeline(
        PipelineSpec(convert=ConvertStage(donor="stories260K.bin", tokenizer="tok512.bin", mixer="gla"),
                     train=TrainStage(data=TrainingData(["stories.txt"]), config=TrainConfig(max_steps=400)),
                     evaluate=EvaluateStage(contexts=(128, 512))),
        work_dir="runs/job-1", publish_to="data/models/stories-gla", on_event=print)

A conversion starts from a donor (`convert`); a fine-tune from a model folder (`base_model`). A
conversion may first train its mixers layer by layer on the donor's attention (`attention_transfer`,
see `xatl.training.attention_transfer`), then end to end. The workers run jobs through this
function, and so does the XATL-vs-scratch benchmark; `xatl train` runs its training stage alone
(`xatl.training.run`).

Resumable: each stage leaves its output in `work_dir` and a finished stage is not run again, so
calling again with the same arguments after a crash picks up where the last call stopped —
attention transfer or training from its last checkpoint (`save_every`). Outputs appear atomically
(written aside, then renamed), so a crash never leaves half a stage that looks finished.
`should_stop` is polled between stages and after every training step; a stopped run returns with
`stopped=True` (a training stage saves a checkpoint first).

Events, passed to `on_event` (JSON-ready dicts, rank 0 only): `{"event": "stage", "stage", "status":
"started" | "done" | "skipped", ...}` for every stage, `{"event": "resume", "stage", "step",
"checkpoint"}` when a stage continues a checkpoint, the training loops' own events (`train`, `eval`,
`unfreeze`, `checkpoint`, `done`, `stopped`; see `xatl.training.loop` and
`xatl.training.attention_transfer`) with the `stage` that sent them ("attention_transfer" or
"train"), and `{"event": "published", "path"}`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from xatl.artifacts import (
    LOSS_CURVE,
    METRICS_FILE,
    MODEL_CARD,
    RESULT_FILE,
    TRANSFER_REPORT,
    publish,
    read_json,
    saved_precision,
    write_atomic,
    write_json_atomic,
)
from xatl.loader import pick_device
from xatl.mixers import DEFAULT_MIXER
from xatl.pipeline_card import pipeline_card
from xatl.serving.precision import apply_precision, check_precision, save_at_precision
from xatl.training.attention_transfer import AttentionTransferConfig
from xatl.training.loop import TrainConfig
from xatl.training.run import (
    AttentionTransferRun,
    TrainingData,
    TrainingRun,
    end_distributed,
    run_attention_transfer,
    run_training,
    start_distributed,
)
from xatl.transfer import DEFAULT_TRANSFER

JOB_MARKER = "xatl_job.json"  # in a published model folder: which run made it


@dataclass
class ConvertStage:
    donor: str
    tokenizer: str | None = None  # a llama2.c donor's tokenizer .bin
    mixer: str = DEFAULT_MIXER
    attention_layers: Sequence[int] = ()
    transfer: str = DEFAULT_TRANSFER
    mixer_options: dict | None = None  # {option: value} for `mixer`
    seed: int = 0


@dataclass
class AttentionTransferStage:
    config: AttentionTransferConfig
    data: TrainingData | None = None  # default: the train stage's text (or the blocks run_pipeline gets)


@dataclass
class TrainStage:
    config: TrainConfig
    data: TrainingData | None = None  # None when run_pipeline gets blocks
    teacher: str | None = None  # for distillation; default: the donor of a conversion, the base of a fine-tune
    teacher_tokenizer: str | None = None
    freeze_initialised: bool = False


@dataclass
class EvaluateStage:
    data: Sequence[str] | None = None  # default: the training's validation text
    block_size: int | None = None  # default: the training's
    batch_size: int = 8
    max_batches: int | None = 50  # bounds the time on large validation text
    compare_base: bool = True  # also score the donor (conversion) or the base model (fine-tune)
    lm_eval_tasks: Sequence[str] = ()
    lm_eval_limit: int | None = None
    contexts: Sequence[int] = (128, 512)  # decode profile, beside the base's
    decode_tokens: int = 32


@dataclass
class PipelineSpec:
    convert: ConvertStage | None = None
    base_model: str | None = None  # a model folder: a fine-tune
    attention_transfer: AttentionTransferStage | None = None  # a conversion's, before `train`
    train: TrainStage | None = None
    evaluate: EvaluateStage | None = None
    name: str | None = None  # the model's name in its card
    device: str | None = None
    datasets: Sequence[str] = field(default_factory=tuple)  # named in the model card
    precision: str = "fp32"  # the published weights: fp32, bf16 or int8 (see xatl.serving.precision)

    def __post_init__(self):
        check_precision(self.precision)
        if (self.convert is None) == (self.base_model is None):
            raise ValueError("a pipeline starts from a donor to convert or from a base model, exactly one")
        if self.attention_transfer is not None and self.convert is None:
            raise ValueError("attention transfer learns the donor's attention: it needs a conversion (convert)")


@dataclass
class PipelineResult:
    stopped: bool
    model_dir: str | None  # the published folder (or the final one in work_dir without publish_to)
    transfer: dict | None = None  # the transfer report's summary
    train: dict | None = None
    evaluation: dict | None = None
    profile: dict | None = None
    attention_transfer: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_pipeline(
    spec: PipelineSpec,
    work_dir: str | Path,
    *,
    publish_to: str | Path | None = None,
    job_id: str | None = None,
    blocks: Iterable[torch.Tensor] | None = None,
    valid_blocks: Iterable[torch.Tensor] | None = None,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PipelineResult:
    """Run `spec` in `work_dir` (created if needed) and publish the model to `publish_to`.

    `blocks`/`valid_blocks` replace the training text for callers that tokenise it themselves.
    Under torchrun, rank 0 converts, evaluates and publishes while every rank trains; the process
    group ends after training.
    """
    work_dir = Path(work_dir)
    rank, world = start_distributed()
    emit = (on_event or (lambda event: None)) if rank == 0 else (lambda event: None)
    stop = should_stop or (lambda: False)
    stages = _Stages(spec, work_dir, emit, rank, world)
    try:
        # 1. The starting model
        start_dir = stages.convert() if spec.convert is not None else Path(spec.base_model)
        transfer = _transfer_summary(start_dir)
        if _agree(stop(), world):  # every process stops, or none (the others would wait in training)
            return PipelineResult(True, None, transfer)

        # 2. Attention transfer (one process), then end-to-end training
        transferred = None
        if spec.attention_transfer is not None:
            if world > 1:
                raise ValueError("attention transfer runs in one process: run this pipeline without torchrun")
            transferred = stages.attention_transfer(start_dir, blocks, valid_blocks, stop)
            if transferred["stopped"] or stop():  # stopped inside the stage, or after it
                return PipelineResult(True, None, transfer, attention_transfer=transferred)
            start_dir = work_dir / "attention_transfer"
        final_dir, train_result = start_dir, None
        if spec.train is not None:
            train_result = stages.train(start_dir, blocks, valid_blocks, stop)
            if train_result.get("stopped"):
                return PipelineResult(True, None, transfer, train_result, attention_transfer=transferred)
            final_dir = work_dir / "train"
        end_distributed()  # what follows is rank 0's alone (evaluation would otherwise wait for the others)
        if rank != 0:
            return PipelineResult(False, None, transfer, train_result)

        # 3. Evaluation and the decode profile, beside the donor's (or the base model's)
        evaluation = profile = None
        if spec.evaluate is not None and not stop():
            evaluation = stages.evaluate(final_dir, valid_blocks)
        if spec.evaluate is not None and not stop():
            profile = stages.profile(final_dir)
        if stop():
            return PipelineResult(True, None, transfer, train_result, evaluation, profile, transferred)

        # 4. The model folder: weights, tokenizer, report, metrics, loss curve, card — then published
        result = PipelineResult(False, None, transfer, train_result, evaluation, profile, transferred)
        model_dir = stages.assemble(final_dir, result, job_id)
        if publish_to is not None:
            model_dir = stages.publish(model_dir, Path(publish_to), job_id)
        result.model_dir = str(model_dir)
        return result
    finally:
        end_distributed()


class _Stages:
    """The stages of one pipeline run, each skipping itself when its output is already there."""

    def __init__(self, spec: PipelineSpec, work_dir: Path, emit, rank: int, world: int):
        self.spec, self.work_dir, self.emit, self.rank, self.world = spec, work_dir, emit, rank, world
        self.device = pick_device(spec.device)

    def _stage(self, name: str, status: str, **details) -> None:
        self.emit({"event": "stage", "stage": name, "status": status, "time": time.time(), **details})

    # -- convert --------------------------------------------------------------------------------------
    def convert(self) -> Path:
        from xatl.convert import convert

        out = self.work_dir / "converted"
        if self.rank == 0:  # the others wait at the barrier: one process converts, every one then reads it
            if (out / "config.json").is_file():
                self._stage("convert", "skipped", reason="converted in an earlier attempt")
            else:
                self._stage("convert", "started")
                stage = self.spec.convert
                partial = self.work_dir / "converted.partial"
                shutil.rmtree(partial, ignore_errors=True)
                options = {stage.mixer: stage.mixer_options} if stage.mixer_options else None
                conversion = convert(stage.donor, tokenizer=stage.tokenizer, mixer=stage.mixer,
                                     attention_layers=list(stage.attention_layers), transfer=stage.transfer,
                                     mixer_options=options, seed=stage.seed, out=partial)
                partial.rename(out)
                self._stage("convert", "done", **conversion.report.summary())
        _barrier(self.world)
        return out

    def _tagged(self, stage: str):
        """`emit` for a stage's own events: each names the stage."""
        return lambda event: self.emit({**event, "stage": stage})

    def _resume_point(self, stage: str, out: Path) -> Path | None:
        """The latest checkpoint an earlier attempt of `stage` left in `out`, announced."""
        from xatl.training.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(out) if out.is_dir() else None
        if checkpoint is not None:
            self.emit({"event": "resume", "stage": stage, "step": int(checkpoint.name.split("-")[-1]),
                       "checkpoint": str(checkpoint)})
        return checkpoint

    # -- attention transfer ---------------------------------------------------------------------------
    def attention_transfer(self, start_dir: Path, blocks, valid_blocks, stop) -> dict:
        out = self.work_dir / "attention_transfer"
        done = read_json(out / RESULT_FILE)
        if done is not None:
            self._stage("attention_transfer", "skipped", reason="transferred in an earlier attempt")
            return done
        stage, donor = self.spec.attention_transfer, self.spec.convert
        data = stage.data
        if data is None and blocks is None:  # the text of end-to-end training
            data = self.spec.train.data if self.spec.train is not None else None
            if data is None:
                raise ValueError("attention transfer needs its text: AttentionTransferStage.data, the train "
                                 "stage's, or blocks")
        own_text = stage.data is not None
        checkpoint = self._resume_point("attention_transfer", out)
        self._stage("attention_transfer", "started")
        run = AttentionTransferRun(model_dir=start_dir, config=stage.config, out_dir=out, teacher=donor.donor,
                                   teacher_tokenizer=donor.tokenizer, data=data, device=str(self.device),
                                   resume=checkpoint if checkpoint is not None else False)
        started = time.perf_counter()
        result = run_attention_transfer(run, blocks=None if own_text else blocks,
                                        valid_blocks=None if own_text else valid_blocks,
                                        on_event=self._tagged("attention_transfer"), should_stop=stop)
        summary = {"steps": result.step, "total_steps": result.total_steps, "tokens": result.tokens,
                   "loss": result.loss, "layer_losses": result.layer_losses, "valid_loss": result.valid_loss,
                   "seconds": time.perf_counter() - started, "stopped": result.stopped}
        if not result.stopped:
            write_json_atomic(out / RESULT_FILE, summary)
            self._stage("attention_transfer", "done", **summary)
        return summary

    # -- train ----------------------------------------------------------------------------------------
    def train(self, start_dir: Path, blocks, valid_blocks, stop) -> dict:
        out = self.work_dir / "train"
        done = read_json(out / RESULT_FILE)
        if done is not None:
            self._stage("train", "skipped", reason="trained in an earlier attempt")
            return done
        stage = self.spec.train
        checkpoint = self._resume_point("train", out)
        self._stage("train", "started")
        teacher, teacher_tokenizer = stage.teacher, stage.teacher_tokenizer
        if teacher is None and stage.config.distill:  # the donor teaches its conversion; the base its fine-tune
            if self.spec.convert is not None:
                teacher, teacher_tokenizer = self.spec.convert.donor, self.spec.convert.tokenizer
            else:
                teacher = self.spec.base_model
        run = TrainingRun(model_dir=start_dir, config=stage.config, out_dir=out, data=stage.data, teacher=teacher,
                          teacher_tokenizer=teacher_tokenizer, freeze_initialised=stage.freeze_initialised,
                          device=str(self.device), resume=checkpoint if checkpoint is not None else False)
        started = time.perf_counter()
        result = run_training(run, blocks=blocks, valid_blocks=valid_blocks, on_event=self._tagged("train"),
                              should_stop=stop)
        summary = {"steps": result.step, "total_steps": result.total_steps, "tokens": result.tokens,
                   "loss": result.loss, "valid_loss": result.valid_loss, "unfreeze_step": result.unfreeze_step,
                   "seconds": time.perf_counter() - started, "stopped": result.stopped}
        if not result.stopped and self.rank == 0:
            write_json_atomic(out / RESULT_FILE, summary)
            self._stage("train", "done", **summary)
        return summary

    # -- evaluate -------------------------------------------------------------------------------------
    def evaluate(self, model_dir: Path, valid_blocks) -> dict:
        from xatl.eval import evaluate_loss, run_lm_eval
        from xatl.loader import load_model

        path = self.work_dir / "evaluation.json"
        if (done := read_json(path)) is not None:
            self._stage("evaluate", "skipped", reason="evaluated in an earlier attempt")
            return done
        self._stage("evaluate", "started")
        stage = self.spec.evaluate
        model, tokenizer = load_model(model_dir, device=self.device, dtype=torch.float32, dequantize=True)
        blocks = valid_blocks if valid_blocks is not None else self._validation_blocks(tokenizer)
        result: dict = {}
        if blocks is not None:
            blocks = list(blocks)
            result["valid_loss"] = evaluate_loss(model, blocks, batch_size=stage.batch_size,
                                                 max_batches=stage.max_batches).loss
            if stage.compare_base:
                base = self._base_model()
                result["base_valid_loss"] = evaluate_loss(base, blocks, batch_size=stage.batch_size,
                                                          max_batches=stage.max_batches).loss
                result["gap"] = result["valid_loss"] - result["base_valid_loss"]
                del base
            if self.spec.precision != "fp32":  # the published weights' loss too (int8 runs on the CPU)
                model = apply_precision(model.cpu() if self.spec.precision == "int8" else model, self.spec.precision)
                result[f"valid_loss_{self.spec.precision}"] = evaluate_loss(
                    model, blocks, batch_size=stage.batch_size, max_batches=stage.max_batches).loss
        if stage.lm_eval_tasks:
            harness = run_lm_eval(model_dir, list(stage.lm_eval_tasks), limit=stage.lm_eval_limit,
                                  device=str(self.device))
            result["lm_eval"] = harness["results"]
        write_json_atomic(path, result)
        self._stage("evaluate", "done", **{k: v for k, v in result.items() if k != "lm_eval"})
        return result

    def _validation_blocks(self, tokenizer):
        from xatl.data import TextBlocks

        stage, train = self.spec.evaluate, self.spec.train
        block_size = stage.block_size or (train.data.block_size if train and train.data else 512)
        if stage.data:
            return TextBlocks(list(stage.data), tokenizer, block_size, keep_partial=True)
        if train is None or train.data is None:
            return None
        data = train.data
        if data.valid_data:
            return TextBlocks(list(data.valid_data), tokenizer, block_size, keep_partial=True,
                              text_field=data.text_field)
        if data.valid_fraction == 0:
            return None
        return TextBlocks(list(data.data), tokenizer, block_size, split="validation",
                          valid_fraction=data.valid_fraction, split_by=data.split_by, keep_partial=True,
                          text_field=data.text_field, seed=train.config.seed)

    def _base_model(self):
        """The donor rebuilt with attention everywhere (a conversion), or the base model (a fine-tune)."""
        from xatl.loader import load_teacher

        if self.spec.convert is not None:
            return load_teacher(self.spec.convert.donor, self.spec.convert.tokenizer, self.device)
        return load_teacher(self.spec.base_model, None, self.device)

    # -- profile --------------------------------------------------------------------------------------
    def profile(self, model_dir: Path) -> dict:
        from xatl.loader import load_model
        from xatl.serving.profile import decode_profile

        path = self.work_dir / "profile.json"
        if (done := read_json(path)) is not None:
            self._stage("profile", "skipped", reason="profiled in an earlier attempt")
            return done
        self._stage("profile", "started")
        stage = self.spec.evaluate
        model, tokenizer = load_model(model_dir, device=self.device, dtype=torch.float32, dequantize=True)
        result = {"model": decode_profile(model, tokenizer, stage.contexts, decode_tokens=stage.decode_tokens)}
        if stage.compare_base:
            result["base"] = decode_profile(self._base_model(), tokenizer, stage.contexts,
                                            decode_tokens=stage.decode_tokens)
        write_json_atomic(path, result)
        self._stage("profile", "done", **result)
        return result

    # -- the model folder -----------------------------------------------------------------------------
    def assemble(self, final_dir: Path, result: PipelineResult, job_id: str | None) -> Path:
        """The folder to publish: the final weights and tokenizer, the transfer report, the training
        metrics and loss curve, the model card and which run made it."""
        out = self.work_dir / "model"
        if (out / "config.json").is_file() and (out / JOB_MARKER).is_file():
            return out
        partial = self.work_dir / "model.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for item in final_dir.iterdir():
            if item.is_file() and item.name != RESULT_FILE:  # not checkpoints/ (resumable state, not the model)
                shutil.copy2(item, partial / item.name)
        if (partial / METRICS_FILE).is_file():
            from xatl.plots import loss_curve

            loss_curve(partial / METRICS_FILE, partial / LOSS_CURVE, title=self.spec.name or "training")
        if saved_precision(partial) != self.spec.precision:  # weights saved as they are served
            save_at_precision(partial, partial, self.spec.precision)
        write_atomic(partial / MODEL_CARD, pipeline_card(self.spec, result))
        write_json_atomic(partial / JOB_MARKER, {"job_id": job_id, "result": result.to_dict()})
        partial.rename(out)
        return out

    def publish(self, model_dir: Path, destination: Path, job_id: str | None) -> Path:
        marker = read_json(destination / JOB_MARKER)
        if marker is not None and marker.get("job_id") == job_id:  # published by an earlier attempt
            self._stage("publish", "skipped", reason="published in an earlier attempt")
            return destination
        self._stage("publish", "started")
        publish(model_dir, destination, copy=True)
        self.emit({"event": "published", "path": str(destination)})
        self._stage("publish", "done")
        return destination


def _transfer_summary(model_dir: Path) -> dict | None:
    report = read_json(model_dir / TRANSFER_REPORT)
    return report.get("summary") if isinstance(report, dict) else None


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _agree(flag: bool, world: int) -> bool:
    """True on every process when any says so."""
    if world == 1:
        return bool(flag)
    value = torch.tensor([float(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


__all__ = ["AttentionTransferStage", "ConvertStage", "EvaluateStage", "JOB_MARKER", "PipelineResult", "PipelineSpec",
           "TrainStage", "run_pipeline"]
