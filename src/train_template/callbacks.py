"""Callbacks every run gets, whatever its module: per-step LR log, streaming-resume
guard, non-finite-loss guard, predictions file, and the sample-id audit used by tests;
plus Lightning's ThroughputMonitor with its rates in the progress bar, for configs to add.

None of them needs the module's cooperation: they read what Lightning hands every
callback (the optimizer, the step's outputs, the loader)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info

from train_template.errors import UserError
from train_template.planning import TrainingPlanCallback


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


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's ThroughputMonitor, whose training rates also show in the progress bar.

    Lightning's writes samples/s, items/s (tokens, with a ``length_fn``) and FLOP/s only
    to the loggers, every ``log_every_n_steps`` steps; a person watching a run wants
    them next to the loss. This adds ``samples/s`` and ``<items_name>/s`` (all ranks
    together, Lightning's estimate) to the bar at the same moments and changes nothing
    else. Rank 0 only, as Lightning's hooks are: no collective, no extra host sync.
    """

    def __init__(
        self,
        batch_size_fn: Callable[[Any], int],
        length_fn: Callable[[Any], int] | None = None,
        items_name: str = "items",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            batch_size_fn: Samples in a batch (Lightning's argument).
            length_fn: Items (e.g. tokens) in a batch, or None (Lightning's argument).
            items_name: What an item is, for the bar's label (``tokens`` -> ``tokens/s``).
            kwargs: Lightning's ``Throughput`` options (``window_size``, ``separator``).
        """
        # Typed as Lightning types them: jsonargparse turns "module.function" into the function.
        super().__init__(batch_size_fn, length_fn, **kwargs)
        self.items_name = items_name

    def _compute(self, trainer: pl.Trainer, iter_num: int | None = None) -> None:
        super()._compute(trainer, iter_num)
        if not trainer.training or not trainer._logger_connector.should_update_logs:
            return
        throughput = self._throughputs[trainer.state.stage]
        rates = throughput.compute()
        shown = {"samples/s": "samples_per_sec", f"{self.items_name}/s": "items_per_sec"}
        for label, key in shown.items():
            per_device = rates.get(f"device{throughput.separator}{key}")
            if per_device is not None:  # None until the window is full
                value = per_device * trainer.world_size
                trainer.lightning_module.log(label, value, prog_bar=True, logger=False)


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
    """Stops training on a NaN or infinite loss, and never lets a checkpoint written after
    one (or holding non-finite weights) replace the last good checkpoint.

    No host sync per step: every step only folds ``isfinite(loss)`` into a flag kept
    on the loss's device. The flag is read (one sync; with several processes one
    all-reduce through the strategy, so all ranks stop together) every
    ``log_every_n_steps`` batches, where Lightning syncs for logging anyway, and before
    every checkpoint save. Checkpoint callbacks run after all others, and a save is
    refused from inside ``on_save_checkpoint``, so ``last.ckpt`` stays the last good one.
    """

    def __init__(self) -> None:
        self._finite: torch.Tensor | None = None  # on the device: all losses finite so far

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
            self._check_loss(trainer, f"epoch {trainer.current_epoch}, batch {batch_idx}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loss(trainer, f"epoch {trainer.current_epoch}")

    def _check_loss(self, trainer: pl.Trainer, where: str) -> None:
        bad = self._finite is not None and not bool(self._finite)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise UserError(
                f"the training loss became non-finite by {where} (global step "
                f"{trainer.global_step}): lower the learning rate "
                "(--model.optimizer.init_args.lr) or set --trainer.gradient_clip_val; "
                "the last good checkpoint is kept"
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every rank builds the checkpoint (rank 0 writes it): a collective is safe here.
        self._check_loss(trainer, "this checkpoint")
        # A finite loss can still be followed by an update that makes weights inf/NaN.
        # One sync for all parameters; decided together (FSDP shards differ per rank).
        params = list(pl_module.parameters())
        bad = bool(params) and not bool(
            torch.stack([torch.isfinite(p).all() for p in params]).all()
        )
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            name = next(
                (n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()),
                "on another rank",
            )
            raise UserError(
                f"the weights became non-finite ({name}) at global step {trainer.global_step}: "
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
    """Writes ``predictions.csv`` to the run's log directory (one file per rank in DDP).

    Works for any ``predict_step`` that returns a dict of equal-length 1-D tensors or
    lists (one column per key, e.g. ``index`` and ``prediction``). A dict with only a
    ``text`` list (generated text) goes to ``predictions.txt`` instead, one entry
    after another, for a person to read. Anything else is left to the user's own writer.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        batches = [batch for batch in predictions if isinstance(batch, dict)]
        if not batches or len(batches) != len(predictions):
            return
        columns = list(batches[0])
        suffix = "" if trainer.world_size == 1 else f"-rank{trainer.global_rank}"
        as_text = columns == ["text"]
        path = Path(trainer.log_dir or ".") / f"predictions{suffix}.{'txt' if as_text else 'csv'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if as_text:
            entries = [text for batch in batches for text in batch["text"]]
            rule = "\n" + "-" * 72 + "\n"
            path.write_text(rule.join(entries) + "\n")
            rank_zero_info(f"predictions written to {path}")
            return
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for batch in batches:
                values = [_as_list(batch[column]) for column in columns]
                writer.writerows(zip(*values, strict=True))
        rank_zero_info(f"predictions written to {path}")


def _as_list(value: Any) -> list:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)
