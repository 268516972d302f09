"""What the template does during a fit, in the order it happens: one callback, one page.

:func:`template_callbacks` builds the template's callbacks, the one list the CLI, the
benchmarks and the tests use: ``RunMachinery`` (everything below), then the
checkpoint callback (Lightning runs ModelCheckpoint after every other callback), and for
``predict`` the prediction writer. ``RunMachinery`` needs nothing from the module: it
reads what Lightning hands every callback.

At **setup** (``fit``, before the checkpoint is restored and before ``configure_optimizers``)
  1. a resumed fit reads the template's state of its checkpoint, once (``resume.Resume``);
  2. the training plan is made from the real data (``planned_trainer.plan_for_trainer``;
     in the global sample order a checkpoint's global batch wins on any layout, the
     accumulation re-derived) and put on the trainer (``trainer.training_plan``, and
     ``trainer.lr_schedule`` for ``planned_lr_scheduler``): ``estimated_stepping_batches``
     is its ``max_steps``; Lightning's epoch limit becomes the plan's epochs; its step
     limit waits (``seam.loop.release_step_limit``).

At a **resume** (``on_load_checkpoint``, before Lightning restores its loops)
  3. the checkpoint's plan is compared with this launch's (``resume.RESUME_KEYS``, or
     ``GLOBAL_ORDER_RESUME_KEYS`` in the global order): a change stops the run in one
     line; Lightning's micro-batch counters are rescaled to a re-derived accumulation;
  4. (every rank's saved RNG states wait for the first batch.)

At **train start** (the loader built and restored)
  (before it) Lightning prepares the train loader: a plain map-style one gets the global
     order's sampler, positioned at the restored step (``order_loader.py``, installed by
     ``PlannedTrainer`` where Lightning would put its ``DistributedSampler``);
  5. every rank's real batch count is gathered and checked against the plan; a stream
     whose loader saves its position (``StatefulDataLoader``) is read no batch ahead, so
     that position is the last batch trained (``seam.loop.stop_lookahead_of_a_stateful_stream``);
  6. the step limit is set to the plan's ``max_steps``; the plan is printed (rank 0) and
     written to ``<log_dir>/plan.json``;
  7. SIGUSR1/SIGTERM handlers are installed (they only record the signal).

At each **epoch start**
  8. litdata's stale restore flag is cleared (``--data.global_order false``), so the epoch after
     a mid-epoch resume is a fresh, reshuffled epoch (the global order's sampler is moved
     to the epoch by Lightning's own ``set_epoch``).

At each **batch start**
  9. the first batch after a resume puts back this rank's RNG states (dropout).

At each **optimizer step** (after backward, the DDP all-reduce and AMP unscaling)
  10. an epoch's last, short accumulation window gets the mean gradient of the batches it
      holds (:func:`scale_short_window`);
  11. the LR of the step is kept for the loggers (``lr-<Optimizer>`` in ``metrics.csv``;
      read by a step hook on each optimizer, handed over on logging steps, at epoch ends
      and on an exception).

At each **batch end**
  12. ``isfinite(loss)`` is folded into a flag on the device; on logging steps it is read
      (one sync, one all-reduce with several ranks) and a non-finite loss stops the run;
  13. the plan's last step asks Lightning to stop, after validating the final weights;
  14. after a batch that closed an accumulation window, a received signal (agreed by all
      ranks every ``--preemption.check_every_n_steps`` steps) saves ``last.ckpt`` and exits;
  15. then the checkpoint callback saves on its own triggers (``--checkpoint.*``).

At each **epoch end**: the non-finite flag is read; a stream without a length that ended
before the plan's last step stops the run in one line; the checkpoint callback saves.

At each **save** (every rank builds the checkpoint; rank 0 writes it, or under a sharded
strategy each rank its own shard)
  16. a non-finite loss or weight refuses the save, so ``last.ckpt`` stays the last good;
  17. the plan and every rank's RNG states go into the checkpoint;
  (after) ``PlannedTrainer.save_checkpoint`` writes it as ``<name>.partial`` and renames it
     into place once every rank's part is written (``atomic_save.py``).

At the **end of the fit**
  18. rank 0 draws ``<log_dir>/training.png`` from the run's ``metrics.csv`` files
      (``report.plot_run``: loss, LR, validation, throughput; resumed launches included).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from train_template import redact, resume
from train_template.guards import FiniteGuard
from train_template.layout import accumulation_window_size
from train_template.options import LRSchedule, PlanOptions, PreemptionOptions
from train_template.plan import TrainingPlan
from train_template.planned_trainer import check_loader, check_stream_lasted, plan_for_trainer
from train_template.preemption import PreemptionSave
from train_template.report import draw_training_plot, format_plan, write_plan
from train_template.schedule import is_planned_scheduler
from train_template.seam.litdata import clear_stale_restore
from train_template.seam.loop import (
    batch_index,
    is_logging_step,
    release_step_limit,
    set_hook_idle,
    set_step_limit,
    skip_idle_batch_hooks,
    step_counter,
    stop_lookahead_of_a_stateful_stream,
)
from train_template.sharding import check_data_parallel
from train_template.sweep_trial import TrialLink, TrialReporter


def template_callbacks(
    plan: PlanOptions | None = None,
    lr_schedule: LRSchedule | None = None,
    preemption: PreemptionOptions | None = None,
    checkpoint: Callback | None = None,
    predict: bool = False,
) -> list[Callback]:
    """The template's callbacks, in order; use them with ``planned_trainer.PlannedTrainer``.

    ``checkpoint``: the run's ``RunCheckpoint`` (the CLI adds its own from ``--checkpoint.*``).
    ``predict``: add the writer of ``predictions.csv`` / ``predictions.txt``.
    """
    callbacks: list[Callback] = [RunMachinery(plan, lr_schedule, preemption)]
    trial = TrialLink.from_env()  # this fit is a trial of a sweep (train.py sweep)
    if trial is not None and not predict:
        callbacks.append(TrialReporter(trial))
    if predict:
        from train_template.callbacks import PredictionWriter

        callbacks.append(PredictionWriter())
    if checkpoint is not None:
        callbacks.append(checkpoint)
    return callbacks


class RunMachinery(Callback):
    """Every per-run and per-step guarantee of the template, in the order of the module
    docstring. One callback instead of one per concern: Lightning calls every hook of every
    callback on every step, so fewer callbacks is less time per step (and the hooks it leaves
    empty are not called, ``seam.loop.skip_idle_batch_hooks``)."""

    def __init__(
        self,
        plan: PlanOptions | None = None,
        lr_schedule: LRSchedule | None = None,
        preemption: PreemptionOptions | None = None,
    ) -> None:
        self.options = plan or PlanOptions()
        self.lr_schedule = lr_schedule or LRSchedule()
        self.finite = FiniteGuard()
        self.lr_log = StepLRLog()
        self.scale_windows = self.options.scale_partial_accumulation  # set at train start
        self.lr_in_hook = False  # True where the optimizers' step hooks cannot record it
        self.steps: Any = None  # ``completed``: the global step (seam.loop.step_counter)
        self.preemption = PreemptionSave(preemption or PreemptionOptions())
        self.plan: TrainingPlan | None = None
        self.resume: resume.Resume | None = None  # what a resumed fit's checkpoint brings
        skip_idle_batch_hooks(self)

    @property
    def state_key(self) -> str:
        return resume.STATE_KEY  # the template's entry in every checkpoint

    # -- setup and resume (1-4) -----------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer.lr_schedule = self.lr_schedule
        redact.redact_loggers(trainer.loggers)  # before Lightning logs the hyperparameters
        check_data_parallel(trainer.strategy)  # every rank a data-parallel rank
        if stage != "fit":
            return
        self.resume = resume.Resume.read(getattr(trainer, "resuming_from", None))
        self.plan = plan_for_trainer(trainer, pl_module, self.options, self.resume)
        trainer.training_plan = self.plan
        release_step_limit(trainer, self.plan.epochs or 1)  # a stream: one pass

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.plan is None:
            return  # validate/test/predict from a checkpoint: weights only
        if self.resume is None:  # a checkpoint Lightning resolved itself (hpc, registry)
            self.resume = resume.Resume.of(str(trainer.ckpt_path), checkpoint)
        self.resume.apply(checkpoint, self.plan)

    # -- train start (5-7) ----------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = self.plan
        assert plan is not None, "setup('fit') makes the plan"
        check_loader(trainer, plan)
        stop_lookahead_of_a_stateful_stream(trainer)  # its saved position: the batch trained
        set_step_limit(trainer, plan.max_steps)
        planned = any(is_planned_scheduler(c.scheduler) for c in trainer.lr_scheduler_configs)
        log_dir = trainer.log_dir  # a broadcast in DDP: every rank must ask
        if trainer.is_global_zero:
            rank_zero_info(format_plan(plan, planned_schedule=planned))
            if trainer.ckpt_path:  # where a relaunched or requeued job goes on from
                rank_zero_info(
                    f"resumed at global step {trainer.global_step} of {plan.max_steps} "
                    f"(epoch {trainer.current_epoch}) from {trainer.ckpt_path}"
                )
            if log_dir is not None:
                write_plan(plan, log_dir)
        self.preemption.install(trainer.world_size)
        self.finite.start(pl_module)
        # Only the first batch of a resumed fit has work at batch start (the RNG states).
        set_hook_idle(self, "on_train_batch_start", self.resume is None)
        # Before the optimizer step: short accumulation windows exist only with
        # accumulation, and the LR is read from inside the step (StepLRLog.attach).
        self.scale_windows = self.options.scale_partial_accumulation and (
            plan.accumulate_grad_batches > 1 and plan.batches_per_epoch is not None
        )
        self.steps = step_counter(trainer)
        self.lr_in_hook = self.lr_log.attach(trainer, self.steps)
        set_hook_idle(self, "on_before_optimizer_step", not (self.scale_windows or self.lr_in_hook))

    # -- every epoch and step (8-15) ------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        clear_stale_restore(trainer.train_dataloader)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Here, not at train start: Lightning's loops draw from the global generator
        # between on_train_start and the first batch.
        if self.resume is not None:
            self.resume.restore_rng(trainer.global_rank)
            self.resume = None
        set_hook_idle(self, "on_train_batch_start", True)  # until the next resumed fit

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.scale_windows:
            scale_short_window(trainer, self.plan, optimizer)
        if self.lr_in_hook:
            self.lr_log.record(self.steps.completed, optimizer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.finite.fold(outputs)
        if is_logging_step(trainer):
            self.finite.check_loss(trainer, f"epoch {trainer.current_epoch}, batch {batch_idx}")
            self.lr_log.flush(trainer)  # before Lightning writes this step's metrics
        # A length in steps, samples or tokens often ends mid-epoch, where Lightning would
        # stop without validating the final weights; asking it to stop here makes it
        # validate them first (the same step on every rank).
        if self.steps.completed >= self.plan.max_steps:
            trainer.should_stop = True
        self.preemption.after_batch(trainer, batch_idx)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lr_log.flush(trainer)
        self.finite.check_loss(trainer, f"epoch {trainer.current_epoch}")
        check_stream_lasted(trainer, self.plan)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lr_log.detach()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.lr_log.detach()
        self.lr_log.flush(trainer)  # a preemption exit too; Lightning then finalizes loggers

    # -- end of the fit (18) ----------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast in DDP: every rank must ask
        if trainer.is_global_zero and log_dir is not None:
            draw_training_plot(trainer, log_dir, self.plan)

    # -- save (16-17) ---------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.finite.check_before_save(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.plan is None else resume.state_to_save(self.plan)


def scale_short_window(trainer: pl.Trainer, plan: TrainingPlan, optimizer: Any) -> None:
    """Lightning divides every loss by ``accumulate_grad_batches``, also in the epoch's
    last window when it holds fewer batches (Lightning #19987). Gradients are linear in
    the loss, so multiplying them by accumulate / real_window here (after the DDP
    all-reduce and AMP unscaling, before clipping) gives that step the mean gradient over
    the batches it really has, for any module."""
    accumulate = plan.accumulate_grad_batches
    if accumulate == 1 or plan.batches_per_epoch is None:
        return  # no short window: every window is full, or a stream has no epoch end
    window = accumulation_window_size(batch_index(trainer), plan.batches_per_epoch, accumulate)
    if window == accumulate:
        return
    scale = accumulate / window
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.grad.mul_(scale)


class StepLRLog:
    """The LR of every optimizer step in the loggers, as ``lr-<Optimizer>``.

    Lightning's LearningRateMonitor writes only on ``log_every_n_steps`` steps, so a
    complete LR curve needed ``log_every_n_steps: 1``, which makes every logged metric a
    row per step too. Each step's LR is kept here instead (one list append) and handed to
    the loggers on Lightning's logging steps, at epoch ends and when a fit stops on an
    exception: the loggers' code then runs for all rows at once instead of cold on every
    step (``on_before_optimizer_step`` 18 -> 6 us of a tiny step, the hand-over about 7 us a
    step on logging steps; docs/benchmarks.md, 1f).

    The LR is read by a step post-hook on each of the fit's optimizers (``attach``): torch
    calls it right after the update, with the LR the update used (the LR scheduler steps
    after ``optimizer.step`` returns; Lightning counts the step after it too, so
    ``global_step`` is the step's own), with no Lightning hook dispatch per step (the
    template's two per-step hooks cost about 3% of a tiny step, docs/benchmarks.md, 1g).
    Under a GradScaler (``16-mixed``) an overflow skips ``optimizer.step``, while Lightning
    still counts the step: there the callback's ``on_before_optimizer_step`` records
    instead (``attach`` returns True)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, Any, list[Any]]] = []  # (step, optimizer, LR per group)
        self._hooks: list[Any] = []

    def attach(self, trainer: pl.Trainer, steps: Any) -> bool:
        """Record from inside the optimizers' steps from now on; True where the caller must
        record in ``on_before_optimizer_step`` instead (a GradScaler). ``steps``: the
        fit's ``seam.loop.step_counter``."""
        self.detach()
        if not trainer.loggers:
            return False  # nothing to hand the rows to
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return True
        for optimizer in trainer.optimizers:
            hook = optimizer.register_step_post_hook(
                lambda optimizer, args, kwargs: self.record(steps.completed, optimizer)
            )
            self._hooks.append(hook)
        return False

    def detach(self) -> None:
        """Remove the step hooks (at the end of the fit: the optimizers may outlive it)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def record(self, step: int, optimizer: Any) -> None:
        """Keep the LR of global step ``step`` (called only where the fit has loggers:
        ``attach``); the loggers' rows are made when they are handed over."""
        self.rows.append(
            (step, optimizer, [_kept(group["lr"]) for group in optimizer.param_groups])
        )

    def flush(self, trainer: pl.Trainer) -> None:
        rows, self.rows = self.rows, []
        metrics = [(step, _lr_metrics(optimizer, lrs)) for step, optimizer, lrs in rows]
        for logger in trainer.loggers:
            for step, values in metrics:
                logger.log_metrics(values, step=step)


def _lr_metrics(optimizer: Any, lrs: list[Any]) -> dict[str, Any]:
    """``lr-<Optimizer>``, or ``lr-<Optimizer>/pg<n>`` for each of several param groups."""
    name = f"lr-{type(optimizer).__name__}"
    if len(lrs) == 1:
        return {name: lrs[0]}
    return {f"{name}/pg{i + 1}": lr for i, lr in enumerate(lrs)}


def _kept(lr: Any) -> Any:
    """The LR of this step as it stays: a tensor LR (a capturable optimizer's) is updated in
    place by its scheduler, so a copy is kept (on its device: no host sync per step)."""
    return lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
