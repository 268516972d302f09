"""The training plan applied to a fit: measured at ``setup``, checked at train start.

``TrainingPlanCallback`` is the thin glue between the pure plan module and
Lightning. The plan must exist before ``configure_optimizers`` runs, because a
module sizes its LR schedule there (``self.trainer.estimated_stepping_batches``, as
Lightning's docs show), and it must not build the train loader that early: a loader
built before the checkpoint is restored never gets its saved position back
(Lightning #20550). So at ``setup``:

- a data module that knows its per-rank layout without a loader (``train_layout``:
  ``[(batches, samples), ...]`` for every rank, as ``StreamingDataModule`` computes
  with litdata's own length rule) is asked for it;
- any other data source (a plain map-style ``DataLoader``) is measured on a
  throwaway loader from ``train_dataloader()``, prepared the way Lightning prepares
  the real one (its ``DistributedSampler`` included); Lightning then builds its own.

``PlannedTrainer.estimated_stepping_batches`` returns the plan's ``max_steps``
whatever set the length (epochs, steps or samples), and touches no loader. At
``on_train_start`` (loader built, checkpoint restored) the plan is checked against
the real loader on every rank: a mismatch is a one-line error, never a silently
different schedule.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from train_template.errors import UserError
from train_template.plan import (
    TrainingPlan,
    WarmupSetting,
    accumulation_window_size,
    changed_inputs,
    format_plan,
    make_plan,
)

PLAN_FILE = "plan.json"


class PlannedTrainer(pl.Trainer):
    """A Trainer whose ``estimated_stepping_batches`` is the training plan's ``max_steps``.

    Lightning's own estimate builds the train loader when it is read in
    ``configure_optimizers`` (too early for an exact resume) and ignores sample or
    token budgets. Everything else is Lightning's Trainer unchanged.
    """

    @property
    def training_plan(self) -> TrainingPlan | None:
        """The plan of the current fit (``None`` outside ``fit`` or without the callback)."""
        for callback in self.callbacks:
            if isinstance(callback, TrainingPlanCallback) and callback.plan is not None:
                return callback.plan
        return None

    @property
    def estimated_stepping_batches(self) -> int | float:
        plan = self.training_plan
        if plan is not None and self.state.fn == TrainerFn.FITTING:
            return plan.max_steps
        return super().estimated_stepping_batches


class TrainingPlanCallback(Callback):
    """Derives the exact step plan from the real data at setup and applies it."""

    def __init__(
        self,
        max_samples: int | None = None,
        max_tokens: int | None = None,
        warmup_steps: int | None = None,
        warmup_fraction: float | None = None,
        warmup_epochs: float | None = None,
        scale_partial_accumulation: bool = True,
    ) -> None:
        """
        Args:
            max_samples: Train on this many samples (all ranks together) instead of
                ``--trainer.max_epochs``; rounded up to whole optimizer steps.
            max_tokens: Train on this many tokens (all ranks together; token datasets);
                rounded up to whole optimizer steps.
            warmup_steps: Linear LR warmup, in optimizer steps.
            warmup_fraction: Linear LR warmup, as a fraction of all optimizer steps.
            warmup_epochs: Linear LR warmup, in epochs (rounded up to whole steps).
            scale_partial_accumulation: Give the epoch's last, short accumulation window
                the mean gradient of the batches it holds (Lightning divides its loss by
                the full window size, Lightning #19987).
        """
        self.max_samples = max_samples
        self.max_tokens = max_tokens
        self.warmup = WarmupSetting(warmup_steps, warmup_fraction, warmup_epochs)
        self.scale_partial_accumulation = scale_partial_accumulation
        self.plan: TrainingPlan | None = None
        self._checkpoint_plan: dict | None = None

    def make(self, **loader_and_trainer: Any) -> TrainingPlan:
        """The plan for measured loader numbers and trainer settings, with this
        callback's own inputs (sample or token budget, warmup); for fit and the dry run."""
        return make_plan(
            **loader_and_trainer,
            max_samples=self.max_samples,
            max_tokens=self.max_tokens,
            warmup=self.warmup,
        )

    # -- setup: the plan, before configure_optimizers --------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        length, batch_size, rank_samples, tokens_per_sample = measure_train_data(trainer, pl_module)
        batches = _parse_num_batches(
            RunningStage.TRAINING, length, trainer.limit_train_batches or 1.0
        )
        if isinstance(batches, float) and math.isinf(batches):
            raise UserError("the train loader has no length: the plan needs a sized loader")
        self.plan = self.make(
            batches_per_epoch=int(batches),
            batch_size=batch_size,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            devices=trainer.num_devices,
            num_nodes=trainer.num_nodes,
            rank_samples=rank_samples,
            tokens_per_sample=tokens_per_sample,
            max_epochs=trainer.max_epochs,
            max_steps=trainer.max_steps,
        )
        trainer.fit_loop.max_epochs = self.plan.epochs
        # The step limit goes on at train start, after the checkpoint is restored: while
        # max_steps != -1 Lightning restores loops as "iteration-based" and counts an
        # end-of-epoch checkpoint's epoch twice (the resumed run then stops an epoch
        # early). With -1 here the restore sees epoch semantics, which are exact.
        trainer.fit_loop.epoch_loop.max_steps = -1

    # -- train start: the plan against the real loader, and the checkpoint's plan ----

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = self.plan
        assert plan is not None, "setup('fit') makes the plan"
        batches = trainer.num_training_batches
        counts = _batch_counts_of_all_ranks(trainer, batches)
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
                "StreamingDataModule does by padding short ranks)"
            )
        if counts[0] != plan.batches_per_epoch:
            raise UserError(
                f"the train loader yields {counts[0]} batches per epoch but the plan measured "
                f"{plan.batches_per_epoch} at setup: make train_dataloader() return the same "
                "loader on every call (and train_layout match it)"
            )
        if saved is not None and (changes := changed_inputs(saved, plan)):
            raise _plan_changed(changes)
        # Stop exactly at the plan's end, whichever setting defined the length.
        trainer.fit_loop.epoch_loop.max_steps = plan.max_steps
        log_dir = trainer.log_dir  # a broadcast in DDP: every rank must ask
        if trainer.is_global_zero:
            rank_zero_info(format_plan(plan))
            if log_dir is not None:
                path = Path(log_dir) / PLAN_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(plan.to_json())

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # A length in steps, samples or tokens often ends mid-epoch, where Lightning
        # would stop without validating the final weights; asking it to stop here makes
        # it validate them first (the same step on every rank).
        if self.plan is not None and trainer.global_step >= self.plan.max_steps:
            trainer.should_stop = True

    # -- the short last accumulation window -------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # Lightning divides every loss by accumulate_grad_batches, also in the epoch's
        # last window when it holds fewer batches (Lightning #19987). Gradients are
        # linear in the loss, so multiplying them by accumulate / real_window here
        # (after the DDP all-reduce and AMP unscaling, before clipping) gives that step
        # the mean gradient over the batches it really has, for any module.
        plan = self.plan
        if not self.scale_partial_accumulation or plan is None:
            return
        accumulate = plan.accumulate_grad_batches
        batch_idx = trainer.fit_loop.epoch_loop.batch_idx
        window = accumulation_window_size(batch_idx, plan.batches_per_epoch, accumulate)
        if window == accumulate:
            return
        scale = accumulate / window
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict()} if self.plan is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoint_plan = state_dict.get("plan")


def measure_train_data(
    trainer: pl.Trainer, pl_module: pl.LightningModule
) -> tuple[int, int, list[int] | None, int | None]:
    """(batches per rank before limit_train_batches, batch size, every rank's own samples,
    tokens per sample) of the train data, without building the loader Lightning uses."""
    source = trainer.datamodule if trainer.datamodule is not None else pl_module
    layout = getattr(source, "train_layout", None)
    tokens_per_sample = getattr(source, "tokens_per_sample", None)
    if layout:
        # Short ranks are padded to the longest (StreamingDataModule), so every rank
        # runs max(batches); samples count each rank's own, padding excluded.
        return (
            max(batches for batches, _ in layout),
            int(source.batch_size),
            [samples for _, samples in layout],
            tokens_per_sample,
        )
    # Any other loader: measure a throwaway one, prepared as Lightning prepares its own
    # (the DistributedSampler it injects decides the per-rank length).
    loader = source.train_dataloader()
    prepared = trainer._data_connector._prepare_dataloader(
        loader, shuffle=True, mode=RunningStage.TRAINING
    )
    try:
        length = len(prepared)
    except TypeError:
        raise UserError(
            "the train loader has no length: the plan needs a sized loader (a map-style "
            "dataset, or a data module with train_layout)"
        ) from None
    batch_size = getattr(prepared, "batch_size", None)
    if batch_size is None:
        raise UserError("the train loader has no batch_size: the plan needs a batched loader")
    sampler = getattr(prepared, "sampler", None)
    try:
        samples = [len(sampler)] * trainer.world_size if sampler is not None else None
    except TypeError:
        samples = None
    return length, int(batch_size), samples, tokens_per_sample


def _batch_counts_of_all_ranks(trainer: pl.Trainer, batches: int | float) -> list[int]:
    # A rank with fewer batches would leave the others waiting forever in the
    # gradient all-reduce of the step it never takes: compare before the first step.
    # strategy.all_gather puts the tensor on the root device (NCCL needs it there).
    if trainer.world_size == 1:
        return [int(batches)]
    local = torch.tensor([int(batches)], device=trainer.strategy.root_device)
    return trainer.strategy.all_gather(local).reshape(-1).tolist()


def _plan_changed(changes: list[str]) -> UserError:
    return UserError(
        f"the checkpoint was trained with another plan ({'; '.join(changes)}): resume with "
        "the original devices, num_nodes, batch size, accumulation, data and length, or "
        "start a new run in a new --trainer.default_root_dir"
    )
