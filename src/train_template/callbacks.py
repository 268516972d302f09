"""Callbacks: the plan applied at fit time, a non-finite-loss guard, sample audit, predictions.

``TrainingPlanCallback`` is the thin glue between the pure plan module and
Lightning: it measures the real train loader after any checkpoint has been restored
(``on_train_start`` runs after the fit loop built the loader and loaded its saved
position), makes the plan, checks that every rank agrees, and applies it to the
Trainer and the LR schedule. It never touches the loader before Lightning does,
which is what makes a resumed loader keep its position (Lightning #20550).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info

from train_template.errors import UserError
from train_template.plan import TrainingPlan, WarmupSetting, changed_inputs, format_plan, make_plan

PLAN_FILE = "plan.json"


class TrainingPlanCallback(Callback):
    """Derives the exact step plan from the real train loader and applies it."""

    def __init__(
        self,
        max_samples: int | None = None,
        warmup_steps: int | None = None,
        warmup_fraction: float | None = None,
        warmup_epochs: float | None = None,
    ) -> None:
        """
        Args:
            max_samples: Train on this many samples (all ranks together) instead of
                ``--trainer.max_epochs``; rounded up to whole batches. Conflicts with
                ``--trainer.max_steps``.
            warmup_steps: Linear LR warmup, in optimizer steps.
            warmup_fraction: Linear LR warmup, as a fraction of all optimizer steps.
            warmup_epochs: Linear LR warmup, in epochs (rounded up to whole steps).
        """
        self.max_samples = max_samples
        self.warmup = WarmupSetting(warmup_steps, warmup_fraction, warmup_epochs)
        self.plan: TrainingPlan | None = None
        self._checkpoint_plan: dict | None = None

    def make(self, **loader_and_trainer: Any) -> TrainingPlan:
        """The plan for measured loader numbers and trainer settings, with this
        callback's own inputs (sample budget, warmup); used by fit and the dry run."""
        return make_plan(**loader_and_trainer, max_samples=self.max_samples, warmup=self.warmup)

    def plan_for(
        self, trainer: pl.Trainer, batches_per_epoch: int, rank_samples: list[int] | None
    ) -> TrainingPlan:
        """The plan for this trainer's settings and a measured loader length."""
        return self.make(
            batches_per_epoch=batches_per_epoch,
            batch_size=_batch_size(trainer),
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            devices=trainer.num_devices,
            num_nodes=trainer.num_nodes,
            rank_samples=rank_samples,
            max_epochs=trainer.max_epochs,
            max_steps=trainer.max_steps,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or math.isinf(batches):
            raise UserError("the train loader has no length: the plan needs a sized loader")
        samples = _rank_samples(trainer)
        counts = _batch_counts_of_all_ranks(trainer, pl_module, batches)
        plan = self.plan_for(trainer, batches, samples)
        # Every rank must reach the same decision (one raising while another waits in a
        # collective would hang): world size and the gathered counts are the same
        # everywhere, and once the counts agree so do the plans.
        saved = self._checkpoint_plan
        if saved is not None and saved.get("world_size") != plan.world_size:
            raise _plan_changed(changed_inputs(saved, plan))
        if len(set(counts)) > 1:
            raise UserError(
                f"ranks would train on different batch counts per epoch {counts}, which hangs "
                "DDP: make train_dataloader yield the same count on every rank (as "
                "ShardDataModule does by padding short ranks)"
            )
        if saved is not None and (changes := changed_inputs(saved, plan)):
            raise _plan_changed(changes)
        self.plan = plan
        # Stop exactly at the plan's end, whichever setting defined the length.
        trainer.fit_loop.epoch_loop.max_steps = plan.max_steps
        trainer.fit_loop.max_epochs = plan.epochs
        if hasattr(pl_module, "apply_plan"):
            pl_module.apply_plan(plan)
        log_dir = trainer.log_dir  # a broadcast in DDP: every rank must ask
        if trainer.is_global_zero:
            rank_zero_info(format_plan(plan))
            if log_dir is not None:
                path = Path(log_dir) / PLAN_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(plan.to_json())

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict()} if self.plan is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoint_plan = state_dict.get("plan")


def _batch_size(trainer: pl.Trainer) -> int:
    loader = trainer.train_dataloader
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is None:
        raise UserError("the train loader has no batch_size: the plan needs a batched loader")
    return int(batch_size)


def _rank_samples(trainer: pl.Trainer) -> list[int] | None:
    """Every rank's own samples per epoch (padding not counted): ShardDataModule knows
    all of them; for another loader this rank's count stands for each."""
    layout = getattr(trainer.datamodule, "train_layout", None)
    if layout:
        return [samples for _, samples in layout]
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        return [len(dataset)] * trainer.world_size if dataset is not None else None
    except TypeError:
        return None


def _batch_counts_of_all_ranks(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batches: int
) -> list[int]:
    # A rank with fewer batches would leave the others waiting forever in the
    # gradient all-reduce of the step it never takes: compare before the first step.
    if trainer.world_size == 1:
        return [batches]
    local = torch.tensor([batches], device=pl_module.device)
    return trainer.strategy.all_gather(local).reshape(-1).tolist()


def _plan_changed(changes: list[str]) -> UserError:
    return UserError(
        f"the checkpoint was trained with another plan ({'; '.join(changes)}): resume with "
        "the original devices, num_nodes, batch size, accumulation, data and length, or "
        "start a new run in a new --trainer.default_root_dir"
    )


class StepLRLogger(Callback):
    """The learning rate of every optimizer step in the loggers, as ``lr-<Optimizer>``.

    Lightning's LearningRateMonitor writes only on ``log_every_n_steps`` steps, so a
    complete LR curve needed ``log_every_n_steps: 1``, and that makes every logged
    metric a row per step too (about 0.4 ms per step, 30% of a tiny model's step on
    a CPU). This hands one float per step straight to the loggers instead.
    """

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not trainer.loggers:
            return
        name = f"lr-{type(optimizer).__name__}"
        groups = optimizer.param_groups
        if len(groups) == 1:
            metrics = {name: groups[0]["lr"]}
        else:
            metrics = {f"{name}/pg{i + 1}": group["lr"] for i, group in enumerate(groups)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class StreamingResumeGuard(Callback):
    """Keeps a resumed StreamingDataLoader from replaying its restored state next epoch.

    After ``load_state_dict`` litdata keeps ``restore=True`` until its iterator runs to
    exhaustion, but Lightning stops at the loader's length without exhausting it. The
    epoch after a mid-epoch resume would then start from the stale restored position
    instead of a fresh, reshuffled epoch. ``on_train_epoch_start`` is skipped for the
    resumed epoch itself and runs before every later epoch's iterator is created.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if getattr(loader, "restore", False):
            loader.restore = False


class FiniteLossGuard(Callback):
    """Stops training on a NaN or infinite loss before it reaches a checkpoint.

    Checkpoint callbacks run after all others, so raising here keeps the last good
    checkpoint as ``last.ckpt``.
    """

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise UserError(
                f"the training loss is {loss.item()} at epoch {trainer.current_epoch}, batch "
                f"{batch_idx} (global step {trainer.global_step}): lower the learning rate "
                "(--model.optimizer.init_args.lr) or set --trainer.gradient_clip_val; "
                "the last good checkpoint is kept"
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A finite loss can still be followed by an update that makes weights inf/NaN;
        # never let such weights replace the last good checkpoint.
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise UserError(
                f"the weights became non-finite ({bad[0]}) at global step {trainer.global_step}: "
                "lower the learning rate (--model.optimizer.init_args.lr) or set "
                "--trainer.gradient_clip_val; the last good checkpoint is kept"
            )


class SampleIdRecorder(Callback):
    """Audit trail: which sample ids each training batch held, per rank, as JSON lines,
    and the plan each rank made (``plan-rank<R>.json``).

    A resumed run appends to the same file; for each (epoch, batch) the last line
    written is what the finished run trained on.
    """

    def __init__(self, out_dir: str) -> None:
        """
        Args:
            out_dir: Directory for ``samples-rank<R>.jsonl`` files.
        """
        self.out_dir = out_dir
        self._lr: float | None = None
        self._plan_written = False

    def _write_plan(self, trainer: pl.Trainer) -> None:
        # At the first batch: the plan callback's on_train_start may run after ours.
        plans = [cb.plan for cb in trainer.callbacks if isinstance(cb, TrainingPlanCallback)]
        if plans and plans[0] is not None:
            path = Path(self.out_dir) / f"plan-rank{trainer.global_rank}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(plans[0].to_json())
        self._plan_written = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._plan_written:
            self._write_plan(trainer)
        # The LR the optimizer step of this batch's window uses: the scheduler only
        # steps after on_train_batch_end of the window's last batch.
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        record = {
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "global_step": trainer.global_step,
            "lr": self._lr,
            "ids": batch["index"].tolist(),
        }
        path = Path(self.out_dir) / f"samples-rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (index, prediction) to the run's log directory."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        name = (
            "predictions.csv"
            if trainer.world_size == 1
            else f"predictions-rank{trainer.global_rank}.csv"
        )
        path = Path(trainer.log_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "prediction"])
            for batch in predictions:
                writer.writerows(
                    zip(batch["index"].tolist(), batch["prediction"].tolist(), strict=True)
                )
        rank_zero_info(f"predictions written to {path}")
