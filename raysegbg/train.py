"""The per-worker training loop: plain torch, no Ray import.

`ray_train` runs `train_worker` inside every Ray Train worker; tests and benchmarks run it in
plain processes through the same `WorkerContext`. Rank 0 alone writes TensorBoard and
checkpoints; every rank calls `ctx.report` once per epoch (Ray's report is a barrier).
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from raysegbg import dist
from raysegbg.checkpoint import (
    INFERENCE_KEY,
    checkpoint_name,
    inference_record,
    save_checkpoint,
    save_shared,
)
from raysegbg.config import Config, to_dict
from raysegbg.data.format import read_meta
from raysegbg.data.loader import (
    UNLABELED_SEED,
    SegDataset,
    StreamLoader,
    TrainLoader,
    eval_batches,
    steps_per_epoch,
    stream_dataset,
)  # fmt: skip
from raysegbg.errors import RaysegbgError
from raysegbg.hparams import final_metrics, run_hparams
from raysegbg.methods.base import Batch, Method, StageRun, StepInfo
from raysegbg.metrics import confusion, summarize
from raysegbg.models import convert_global_bn
from raysegbg.optim import lr_scale
from raysegbg.progress import StepProgress, progress_line
from raysegbg.registry import method_class
from raysegbg.state.sharing import stage_state
from raysegbg.step import StepRunner
from raysegbg.tb import RunWriter, triptych_grid

LOG_EVERY = 10  # steps between per-step TensorBoard points (`train/*`, `lr`; see `tb`)


@dataclass
class WorkerContext:
    """What the loop needs from whoever hosts it (a Ray Train worker or a plain process)."""

    run_dir: Path  # or a storage.Uri (same `/` and `.name`) for a run in an object store
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, float], Path | None, str], None] = lambda m, c, n: None
    restore: Callable[[], dict[str, Any] | None] = lambda: None
    log: Callable[[str], None] = print
    state: Any = None  # StateClient of the run's shared-state actor (every rank), or None
    sharing: Any = None  # state.sharing.Sharing: stage results reused across runs, or None


def build_method(cfg: Config, num_classes: int, channels: int, ignore_index: int) -> Method:
    return method_class(cfg.method.name)(cfg, num_classes, channels, ignore_index)


class Trainer:
    """State of one worker's run: the method, its stage's data and optimisers, the counters.

    Starts at the first stage, or where the checkpoint `state` ended.
    """

    def __init__(self, cfg: Config, ctx: WorkerContext, state: dict[str, Any] | None = None):
        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.meta = meta = read_meta(cfg.data.path)
        self.method = build_method(cfg, meta.num_classes, meta.channels, meta.ignore_index)
        if ctx.world_size > 1 and cfg.model.sync_bn:
            convert_global_bn(self.method, ctx.device.type == "cuda")
        self.method.to(ctx.device)
        self.streams = self.method.streams()
        self.train_ds = stream_dataset(cfg.data.path, self.streams["train"], cfg.data)
        unlabeled = self.streams.get("unlabeled")
        self.unlabeled_ds = unlabeled and stream_dataset(cfg.data.path, unlabeled, cfg.data)
        self.val_ds = SegDataset(cfg.data.path, cfg.data.val_split, cache=cfg.data.cache,
                                 reader=cfg.data.reader)  # fmt: skip
        self.amp_dtype = _amp_dtype(cfg, ctx.device)
        self.epoch, self.step, self.best = 0, 0, -math.inf
        self.extra: dict[str, float] = {}  # latest per-step method scalars (e.g. a meta loss)
        self.stages = self.method.stages()  # a one-shot stage takes one epoch slot
        slots = [max(1, stage.epochs) for stage in self.stages]
        self.stage_starts = list(itertools.accumulate(slots, initial=0))
        self.total_epochs = self.stage_starts[-1]
        self.stage_index = -1
        self.computing: tuple[Any, str] | None = None  # (SharedStage, key) this run computes
        if state is None:
            self.enter_stage(0)
        else:
            self.load_state_dict(state)

    # -- stages ---------------------------------------------------------------------------
    def stage_of(self, epoch: int) -> int:
        return max(i for i, start in enumerate(self.stage_starts[:-1]) if start <= epoch)

    def stage_run(self) -> StageRun:
        ctx = self.ctx
        return StageRun(self.stage_ds, ctx.device, ctx.rank, ctx.world_size, ctx.state, ctx.log,
                        self.train_ds)  # fmt: skip

    def enter_stage(self, index: int, step0: int | None = None) -> None:
        """Data and optimisers of stage `index` (each stage trains its own parameters on its
        own share of the training split, with its own lr schedule)."""
        cfg, stage = self.cfg, self.stages[index]
        self.stage_index, self.stage = index, stage
        # each stage draws from its own seed: what follows a stage does not depend on whether
        # the run trained it or reused its result (`state/sharing.py`)
        torch.manual_seed(cfg.train.seed * 1_009 + index)
        # (best score, its 1-based epoch) within this stage: what `train.patience` counts from
        self.stage_best: tuple[float, int] = (-math.inf, self.epoch)
        keep = stage.keep
        self.stage_ds = self.train_ds if keep is None else self.train_ds.subset(keep)
        self.method.enter_stage(stage, self.stage_run())
        self.stage_ds = self.method.stage_dataset(stage, self.stage_run())
        self.steps = steps_per_epoch(
            len(self.stage_ds), cfg.train.batch_size, cfg.train.steps_per_epoch
        )
        self.total_steps = self.steps * stage.epochs
        self.stage_step0 = self.step if step0 is None else step0
        data = cfg.data if stage.augment else replace(cfg.data, augment=False, crop_size=0)
        main = self._loader(self.stage_ds, self.streams["train"], data, cfg.train.seed)
        extra = self.streams.get("unlabeled")
        seed = cfg.train.seed + UNLABELED_SEED
        self.loader = StreamLoader(
            main,
            extra and self._loader(self.unlabeled_ds, extra, data, seed),
            data.workers,
            data.prefetch,
            pin_memory=self.ctx.device.type == "cuda",
        )
        self.runner = None  # the previous stage's DDP wrappers go before new ones are built
        if stage.epochs > 0:  # a one-shot stage trains nothing: no optimiser, no DDP
            specs = self.method.optimizers(stage)
            self.runner = StepRunner(specs, cfg.optim, self.ctx.device, self.amp_dtype)

    def _loader(self, dataset: SegDataset, stream, data, seed: int) -> TrainLoader:
        ctx = self.ctx
        batch = stream.batch_size or self.cfg.train.batch_size
        return TrainLoader(dataset, data, batch, self.steps, seed, ctx.rank, ctx.world_size,
                           image_labels=stream.image_labels)  # fmt: skip

    # -- stage results shared with other runs and trials ------------------------------------
    def reuse_stage(self) -> bool:
        """At a shareable stage: True when its result was loaded (the run goes on at the next
        stage); False when this run computes it (published at the stage's end)."""
        sharing = self.ctx.sharing
        share = self.method.shared_stage(self.stage) if sharing is not None else None
        if share is None or self.computing is not None:
            return False
        key = sharing.key(share, self.cfg.data.path, self.cfg.train.seed)
        first = self.stage_starts[self.stage_index]
        found = sharing.begin(key) if self.epoch == first else None  # resumed inside: computing
        if found is None:
            self.computing = (share, key)
            if self.ctx.rank == 0 and self.epoch == first:
                self.ctx.log(f"{self.stage_prefix()}computing stage result {key} (runs and "
                             "trials with the same settings will reuse it)")  # fmt: skip
            return False
        missing, unexpected = self.method.load_state_dict(found["method"], strict=False)
        if unexpected or any(k.startswith(share.prefixes) for k in missing):
            raise RaysegbgError(f"stage result {key} does not fit this model: remove it with "
                                "`raysegbg state rm` and run again")  # fmt: skip
        done = self.stage_starts[self.stage_index + 1]
        self.step += self.total_steps
        self.best = max(self.best, float(found["best"]))
        if self.ctx.rank == 0:
            self.ctx.log(f"{self.stage_prefix()}reused stage result {key}: epochs "
                         f"{first + 1}-{done} not trained again")  # fmt: skip
        self.epoch = done
        return True

    def publish_stage(self) -> None:
        """After each epoch: at the end of a stage this run computed, publish its result."""
        if self.computing is None or self.epoch != self.stage_starts[self.stage_index + 1]:
            return
        share, key = self.computing
        self.computing = None
        state = {"method": stage_state(self.method, share), "best": self.best}
        meta = {"stage": share.name, "settings": share.settings, "seed": self.cfg.train.seed,
                "version": share.version, "run": self.cfg.logging.name}  # fmt: skip
        if self.ctx.sharing.publish(key, state, meta) and self.ctx.rank == 0:
            self.ctx.log(f"{self.stage_prefix()}published stage result {key}")

    # -- one step / one epoch -------------------------------------------------------------
    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        scale = lr_scale(self.cfg.optim, self.step - self.stage_step0, self.total_steps)
        self.runner.set_lr(scale)
        batch = batch.to(self.ctx.device)
        self.method.train()
        info = self.runner.info = StepInfo(self.step, self.epoch, scale)
        with torch.autocast(self.ctx.device.type, self.amp_dtype, enabled=bool(self.amp_dtype)):
            losses = self.method.training_step(batch, self.runner)
        self.extra.update(self.method.after_step(batch, info))
        self.extra.update(self.runner.logged)
        self.step += 1
        if self.ctx.state is not None:
            self.ctx.state.after_step(self.step, self.method)
        return {k: v.detach() for k, v in losses.items()}

    def train_epoch(self, writer: RunWriter) -> dict[str, float]:
        sums: dict[str, torch.Tensor] = {}
        start = time.perf_counter()
        progress = self.step_progress()
        for done, batch in enumerate(self.loader.epoch(self.epoch), 1):
            losses = self.train_step(batch)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.float()
            if self.ctx.rank == 0 and (self.step - 1) % LOG_EVERY == 0:
                writer.scalars({k: float(v) for k, v in losses.items()}, self.step, "train/")
                writer.scalars({"lr": self.runner.lr()}, self.step)
                writer.scalars(self.extra, self.step, prefix="train/")
            if progress is not None:
                progress.update(done, sums.get("loss"))
        seconds = time.perf_counter() - start
        names = sorted(sums)
        totals = dist.all_reduce_sum(torch.stack([sums[k] for k in names]).cpu())
        out = {
            f"train/{k}": float(v) / (self.steps * self.ctx.world_size)
            for k, v in zip(names, totals, strict=True)
        }
        out["perf/images_per_s"] = self.steps * self.cfg.train.batch_size / seconds
        out["perf/epoch_s"] = seconds
        return out

    def step_progress(self) -> StepProgress | None:
        """Rank 0's progress lines within this epoch (`logging.progress_every`)."""
        every = self.cfg.logging.progress_every
        if self.ctx.rank != 0 or every <= 0:
            return None
        head = f"{self.stage_prefix()}epoch {self.epoch + 1:>3}/{self.total_epochs}"
        return StepProgress(self.ctx.log, every, head, self.steps, self.cfg.train.batch_size)

    def stage_prefix(self) -> str:
        return f"[{self.stage.name}] " if len(self.stages) > 1 else ""

    def one_shot(self) -> dict[str, float]:
        """The epoch slot of a one-shot stage: the method's stage work, timed."""
        start = time.perf_counter()
        out = self.method.run_stage(self.stage, self.stage_run())
        seconds = time.perf_counter() - start
        out["perf/images_per_s"] = len(self.stage_ds) / seconds
        out["perf/epoch_s"] = seconds
        return out

    def val_batches(self):
        """This rank's share of the validation split, on the device."""
        cfg, ctx = self.cfg, self.ctx
        for batch in eval_batches(self.val_ds, cfg.train.val_batch_size, ctx.rank, ctx.world_size):
            yield batch.to(ctx.device)

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], Any]:
        """Validation metrics from the confusion matrix summed over ranks, plus rank 0's
        first few (image, mask, prediction) for the TensorBoard grid."""
        self.method.eval()
        n = self.meta.num_classes
        cm = torch.zeros(n, n, dtype=torch.long)
        shown: list[tuple] = []
        for batch in self.val_batches():
            with torch.autocast(self.ctx.device.type, self.amp_dtype, enabled=bool(self.amp_dtype)):
                pred = self.method.predict(batch.images).argmax(1)
            cm += confusion(pred, batch.masks, n, self.meta.ignore_index).cpu()
            if len(shown) < self.cfg.logging.num_images:
                shown.extend(zip(batch.images, batch.masks, pred, strict=True))
        dist.all_reduce_sum(cm)
        metrics = summarize(cm.numpy(), self.meta.classes)
        return {f"val/{k}": v for k, v in metrics.items()}, shown[: self.cfg.logging.num_images]

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "optimizers": self.runner.state_dict() if self.runner else None,
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "stage": self.stage_index,
            "stage_step0": self.stage_step0,
            "stage_best": list(self.stage_best),
            "rng": torch.get_rng_state(),
            "config": to_dict(self.cfg),
            INFERENCE_KEY: inference_record(self.cfg, self.meta),  # predict without the dataset
        }

    def patience_spent(self, epoch: int | None = None) -> bool:
        """`train.patience` epochs of the last stage without a better score (after `epoch`
        epochs, default the ones done): the run ends."""
        epoch = self.epoch if epoch is None else epoch
        patience = self.cfg.train.patience
        last_stage = self.stage_index == len(self.stages) - 1
        return patience > 0 and last_stage and epoch - self.stage_best[1] >= patience

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the checkpoint's epoch: in its stage with its optimiser states, or
        at the start of the next stage; the global RNG as it was when the checkpoint was
        written, so a resumed run draws what an uninterrupted one does."""
        self.method.load_state_dict(state["method"])
        self.epoch, self.step, self.best = state["epoch"] + 1, state["step"], state["best"]
        if self.ctx.state is not None and state.get("shared"):
            self.ctx.state.restore(state["shared"])  # the actor goes back to this checkpoint
        index, saved = self.stage_of(self.epoch), state.get("stage", 0)
        if index != saved:  # the checkpoint ended a stage: the next one starts afresh
            torch.set_rng_state(state["rng"])
            self.enter_stage(index)
            return
        self.enter_stage(index, state.get("stage_step0", 0))
        if "stage_best" in state:  # a checkpoint from before `train.patience`: counts anew
            self.stage_best = (float(state["stage_best"][0]), int(state["stage_best"][1]))
        if self.runner is not None:
            self.runner.load_state_dict(state["optimizers"])
        torch.set_rng_state(state["rng"])


def _amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if not (cfg.train.amp and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train_worker(cfg: Config, ctx: WorkerContext) -> dict[str, float]:
    """Train from the last checkpoint (if any) to `cfg.train.epochs`; returns the last metrics."""
    if ctx.state is not None:
        ctx.state.attach()  # from now on, what an earlier worker group sends is refused
    state = ctx.restore()
    trainer = Trainer(cfg, ctx, state)
    if state is not None:
        ctx.log(f"resuming at epoch {trainer.epoch + 1} (step {trainer.step})")
    if trainer.epoch >= trainer.total_epochs or trainer.patience_spent():
        return _already_done(trainer)
    rank0 = ctx.rank == 0
    writer = RunWriter(ctx.run_dir / "tb" if rank0 else None, resumed_at=trainer.step or None)
    metrics: dict[str, float] = {}
    try:
        while trainer.epoch < trainer.total_epochs:
            if trainer.stage_of(trainer.epoch) != trainer.stage_index:
                trainer.enter_stage(trainer.stage_of(trainer.epoch))
            if trainer.reuse_stage():
                continue
            metrics = run_epoch(trainer, writer)
            trainer.epoch += 1
            trainer.publish_stage()
            if trainer.patience_spent():
                _log_early_stop(trainer)
                break
        if rank0 and metrics:
            writer.hparams(run_hparams(to_dict(cfg)), final_metrics(metrics, [cfg.logging.score]))
    finally:
        if ctx.sharing is not None:
            ctx.sharing.abandon()  # a claim still held: the run failed inside its stage
        writer.close()
    return metrics


def _log_early_stop(trainer: Trainer) -> None:
    if trainer.ctx.rank == 0:
        best, epoch = trainer.stage_best
        trainer.ctx.log(
            f"stopped early at epoch {trainer.epoch}: {trainer.cfg.logging.score} has not "
            f"improved for {trainer.cfg.train.patience} epochs (best {best:.4f} at epoch {epoch})"
        )


def _already_done(trainer: Trainer) -> dict[str, float]:
    """Re-running a finished run reports its final validation metrics and trains nothing."""
    if trainer.ctx.rank == 0:
        early = trainer.epoch < trainer.total_epochs
        done = f"stopped early at epoch {trainer.epoch}" if early else f"{trainer.epoch} epochs"
        trainer.ctx.log(f"run already complete ({done}): evaluating only")
        trainer.ctx.log(
            f"hint: use --from-run {trainer.ctx.run_dir} to start a fresh run from it (or "
            f"raise train.{'patience' if early else 'epochs'} to continue this one)"
        )
    metrics, _ = trainer.evaluate()
    metrics.update({"epoch": trainer.epoch, "step": trainer.step, "best_score": trainer.best})
    trainer.ctx.report(metrics, None, checkpoint_name(trainer.epoch))
    return metrics


def run_epoch(trainer: Trainer, writer: RunWriter) -> dict[str, float]:
    cfg, ctx, epoch = trainer.cfg, trainer.ctx, trainer.epoch
    metrics = trainer.train_epoch(writer) if trainer.stage.epochs else trainer.one_shot()
    if trainer.stage.epochs:
        metrics.update(trainer.method.after_epoch(trainer.val_batches))
    val, shown = trainer.evaluate()
    metrics.update(val)
    score = metrics.get(cfg.logging.score, float("nan"))
    trainer.best = max(trainer.best, score) if score == score else trainer.best
    if score > trainer.stage_best[0]:  # NaN never improves
        trainer.stage_best = (score, epoch + 1)
    metrics.update({"epoch": epoch + 1, "step": trainer.step, "best_score": trainer.best})
    if ctx.rank == 0:
        writer.epoch_scalars(metrics, epoch + 1)
        last = epoch + 1 == trainer.total_epochs
        if shown and ((epoch + 1) % cfg.logging.image_every == 0 or last):
            grid = triptych_grid(*zip(*shown, strict=True), trainer.meta.ignore_index)
            writer.image("val/images", grid, epoch + 1)
        for tag, image in trainer.method.tb_images().items():
            writer.image(tag, image, epoch + 1)
        for tag, values in trainer.method.tb_histograms().items():
            writer.histogram(tag, values, epoch + 1)
        ctx.log(trainer.stage_prefix() + progress_line(metrics, trainer.total_epochs))
    _report(trainer, metrics)
    return metrics


def _report(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint of this epoch (named by its 1-based
    number, as the progress line shows it)."""
    name = checkpoint_name(trainer.epoch + 1)
    if trainer.ctx.rank != 0:
        trainer.ctx.report(metrics, None, name)
        return
    with tempfile.TemporaryDirectory(prefix="raysegbg-ckpt-") as tmp:
        done = trainer.epoch + 1
        # the run ends with this checkpoint (its last epoch, or patience spent): what a caller
        # that waits for a finished run reads (`raysegbg compare`)
        complete = done >= trainer.total_epochs or trainer.patience_spent(done)
        meta = {"epoch": done, "step": trainer.step, "metrics": metrics, "complete": complete}
        save_checkpoint(Path(tmp), trainer.state_dict(), meta)
        if trainer.ctx.state is not None:
            save_shared(Path(tmp), trainer.ctx.state.checkpoint(trainer.method))
        trainer.ctx.report(metrics, Path(tmp), name)
