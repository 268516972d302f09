"""The Trainer of a planned run, and the checks of its plan against the real loader.

The plan must exist before ``configure_optimizers`` (a module sizes its schedule from
``trainer.estimated_stepping_batches``, as Lightning's docs show), and the loader Lightning
trains on must not be built that early: one built before the checkpoint is restored never
gets its saved position back (Lightning #20550). So the plan is made at ``setup`` from a
throwaway loader or the data's own layout (``plan_from_data.plan_for``), and at train
start it is checked against the real loader on every rank (:func:`check_loader`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from train_template import atomic_save
from train_template.atomic_save import DirectCheckpointIO
from train_template.errors import UserError
from train_template.options import LRSchedule, PlanOptions
from train_template.order_loader import ordered_train_loader
from train_template.plan import TrainingPlan
from train_template.plan_from_data import plan_for
from train_template.redact import redact_checkpoint
from train_template.resume import Resume
from train_template.seam.checkpoint import edit_every_checkpoint
from train_template.seam.loop import replace_train_sampler


class PlannedTrainer(pl.Trainer):
    """A Trainer that holds the run's plan; ``estimated_stepping_batches`` is its ``max_steps``.

    Lightning's own estimate builds the train loader when it is read in
    ``configure_optimizers`` (too early for an exact resume) and ignores sample or token
    budgets. ``fit`` also keeps the checkpoint it resumes (``resuming_from``), which the
    plan reads at setup (Lightning's own ``ckpt_path`` is set only when it restores).
    Everything else is Lightning's Trainer unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training_plan: TrainingPlan | None = None  # set at fit setup
        self.lr_schedule: LRSchedule | None = None  # the run's --lr_schedule
        self.resuming_from: str | None = None  # the checkpoint this fit resumes
        # Lightning splits a map-style loader over ranks only with this on; the template
        # then trains a plain map-style loader in the global order instead (order_loader.py).
        self.use_distributed_sampler = kwargs.get("use_distributed_sampler", True)
        if self.use_distributed_sampler:
            replace_train_sampler(self, lambda loader: ordered_train_loader(loader, self))
        # Secrets in the saved hyperparameters are masked in every checkpoint (redact.py).
        edit_every_checkpoint(self, redact_checkpoint)
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:  # not a plugin of the user's
            self.strategy.checkpoint_io = DirectCheckpointIO()

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """Runs the full optimization routine (Lightning's ``fit``; the checkpoint it resumes is
        kept for the plan).

        Args:
            ckpt_path: The checkpoint to resume: ``last`` or ``auto`` (the newest complete
                checkpoint of the run; ``auto`` starts fresh when there is none), ``best``,
                or a path.
            weights_only: Load the checkpoint with ``torch.load(weights_only=...)``.
        """
        self.resuming_from = None if ckpt_path is None else str(ckpt_path)
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)

    def save_checkpoint(
        self, filepath: Any, weights_only: bool | None = None, storage_options: Any = None
    ) -> None:
        """Lightning's save, complete or absent on any filesystem (``atomic_save.py``): written
        beside its destination under a temporary name, renamed once every rank wrote its part.
        Call it on every process (as Lightning's)."""
        if self.model is None:
            super().save_checkpoint(filepath, weights_only, storage_options)  # Lightning's error
        with self.profiler.profile("save_checkpoint"):
            atomic_save.save_checkpoint(self, filepath, weights_only, storage_options)

    @property
    def estimated_stepping_batches(self) -> int | float:
        if self.training_plan is not None:
            return self.training_plan.max_steps
        return super().estimated_stepping_batches


def plan_for_trainer(
    trainer: PlannedTrainer,
    pl_module: pl.LightningModule,
    options: PlanOptions,
    resume: Resume | None = None,
) -> TrainingPlan:
    """``plan_from_data.plan_for`` with a fit's Trainer numbers (and what a resumed checkpoint
    fixes); the Trainer then accumulates as the plan says."""
    stated = options
    accumulate = trainer.accumulate_grad_batches
    if resume is not None:
        options, accumulate = resume.plan_inputs(options, accumulate)
    try:
        plan = plan_for(
            trainer.datamodule if trainer.datamodule is not None else pl_module,
            world_size=trainer.world_size,
            num_nodes=trainer.num_nodes,
            accumulate_grad_batches=accumulate,
            limit_train_batches=trainer.limit_train_batches,
            max_epochs=trainer.max_epochs,
            max_steps=trainer.max_steps,
            options=options,
            schedule=getattr(trainer, "lr_schedule", None) or LRSchedule(),
            distributed_sampler=getattr(trainer, "use_distributed_sampler", True),
        )
    except UserError as error:
        if options is stated:  # the checkpoint's global batch was not the cause
            raise
        raise UserError(
            f"resuming this run's global batch of {options.global_batch_size} "
            f"(checkpoint) at world size {trainer.world_size}: {error}"
        ) from None
    # Lightning reads this attribute at every batch; set before the loop starts.
    trainer.accumulate_grad_batches = plan.accumulate_grad_batches
    return plan


def check_loader(trainer: pl.Trainer, plan: TrainingPlan) -> None:
    """The real loader against the plan, on every rank, before the first step."""
    if plan.batches_per_epoch is None:
        return  # a stream without a length: nothing to count; check_stream_lasted at its end
    counts = _batch_counts_of_all_ranks(trainer, trainer.num_training_batches)
    # Every rank reaches the same decision: the gathered counts are the same everywhere.
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


def _batch_counts_of_all_ranks(trainer: pl.Trainer, batches: int | float) -> list[int]:
    # A rank with fewer batches would leave the others waiting forever in the gradient
    # all-reduce of the step it never takes. strategy.all_gather puts the tensor on the
    # root device (NCCL needs it there).
    if trainer.world_size == 1:
        return [int(batches)]
    local = torch.tensor([int(batches)], device=trainer.strategy.root_device)
    return trainer.strategy.all_gather(local).reshape(-1).tolist()


def check_stream_lasted(trainer: pl.Trainer, plan: TrainingPlan) -> None:
    """At the end of a stream's one pass: it must have lasted the whole planned length."""
    if plan.batches_per_epoch is None and trainer.global_step < plan.max_steps:
        raise UserError(
            f"the train stream ran dry after {trainer.global_step} of the planned "
            f"{plan.max_steps} optimizer steps ({plan.length_from}): give a longer stream, or "
            f"a length it can fill (--trainer.max_steps {trainer.global_step} or less); the "
            "last checkpoint is kept"
        )
