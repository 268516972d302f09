"""The ``plan`` command: the training plan for any world size, without training.

It calls the same ``plan_from_data.plan_for`` a fit calls at setup, with the config's numbers
instead of a Trainer's: a data module with ``train_layout(world_size)`` (as
``StreamingDataModule``, with litdata's own length rule) is asked, any other is measured
as Lightning's ``DistributedSampler`` would split it. ``--ckpt_path`` prints the plan a resume of that checkpoint would use at the given world
size (in the global sample order: its global batch, the accumulation re-derived) and the
step it continues from, or the one-line refusal a fit would give (the same
``resume.Resume`` read and checks as a fit). ``--lr_curve`` calls the module's own
``configure_optimizers`` under a real (unlaunched) Trainer that holds the plan and steps
its scheduler, so it draws the curve any module (OneCycleLR included) would follow.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from train_template.errors import UserError
from train_template.launch import requested_world_size
from train_template.options import LRSchedule
from train_template.plan import TrainingPlan
from train_template.plan_from_data import plan_for
from train_template.planned_trainer import PlannedTrainer
from train_template.report import draw_lr, format_plan
from train_template.resume import Resume
from train_template.schedule import is_planned_scheduler
from train_template.seam.loop import configured_schedulers, release_step_limit


def print_plan(config: Any, datamodule: Any, model: Any, config_init: Any) -> None:
    """``train.py plan``: the plan table (or ``--json``), a resume's position, the LR curve."""
    trainer = config.trainer
    num_nodes = int(trainer.num_nodes)
    world_size = requested_world_size(trainer.devices, num_nodes)
    if world_size is None:
        raise UserError(
            f"--trainer.devices={trainer.devices}: the dry run needs a device count, e.g. --trainer.devices 8"
        )
    if datamodule is not None and not callable(getattr(datamodule, "train_layout", None)):
        datamodule.setup("fit")  # a map-style module builds its datasets here
    max_epochs = trainer.max_epochs
    if max_epochs is None:  # Lightning's own default
        max_epochs = 1000 if trainer.max_steps == -1 else -1
    options, accumulate = config_init.plan, trainer.accumulate_grad_batches
    resume = resumed_from(config.ckpt_path, config.checkpoint.dirpath) if config.ckpt_path else None
    if resume is not None:  # the plan a resume of this checkpoint would use
        options, accumulate = resume.plan_inputs(options, accumulate)
    plan = plan_for(
        datamodule if datamodule is not None else model,
        world_size=world_size,
        num_nodes=num_nodes,
        accumulate_grad_batches=accumulate,
        limit_train_batches=trainer.limit_train_batches,
        max_epochs=max_epochs,
        max_steps=trainer.max_steps,
        options=options,
        schedule=config_init.lr_schedule,
        distributed_sampler=trainer.use_distributed_sampler,
    )
    if resume is not None:
        resume.check(plan)  # the same one-line refusal a fit would give
        step, where = resume.global_step, ""
        if plan.steps_per_epoch:
            where = f" (epoch {step // plan.steps_per_epoch}, step {step % plan.steps_per_epoch})"
        print(f"resuming {resume.path} at global step {step}{where}")
    if config.json:
        print(plan.to_json())
    optimizers, schedulers = configured(plan, config_init.lr_schedule, model)
    planned = any(is_planned_scheduler(c.scheduler) for c in schedulers)
    if not config.json:
        print(format_plan(plan, planned_schedule=planned))
    if config.lr_curve:
        save_lr_curve(plan, optimizers, schedulers, config.lr_curve)


def resumed_from(ckpt_path: str, checkpoint_dir: str) -> Resume:
    """What ``--ckpt_path`` (``last``/``auto``/a file) brings: the same read as a fit's."""
    from train_template.checkpoint_files import resolve_ckpt_path

    path = resolve_ckpt_path(ckpt_path, checkpoint_dir, announce=lambda *_: None)
    if path is None:
        raise UserError(f"--ckpt_path {ckpt_path}: there is no checkpoint in {checkpoint_dir}")
    resume = Resume.read(path)
    if resume is None or resume.plan is None:
        raise UserError(f"--ckpt_path {path}: the checkpoint holds no training plan")
    return resume


def configured(plan: TrainingPlan, schedule: LRSchedule, model: Any) -> tuple[list, list]:
    """The module's optimizers and schedulers under a Trainer that holds the plan (as a
    fit's does when ``configure_optimizers`` runs); nothing is launched."""
    # Quiet: its device report would describe this machine, not the planned one.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        trainer = PlannedTrainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    finally:
        rank_zero.setLevel(level)
    trainer.training_plan = plan
    trainer.lr_schedule = schedule
    release_step_limit(trainer, plan.epochs)
    try:
        return configured_schedulers(model, trainer)
    except AttributeError as error:
        raise UserError(
            f"--lr_curve: configure_optimizers reads a trainer setting the dry run does not "
            f"have ({error}): draw the curve from a fit's metrics.csv instead"
        ) from None


def planned_learning_rates(plan: TrainingPlan, optimizers: list, schedulers: list) -> list[float]:
    """The LR of every optimizer step, stepping the module's own schedulers as a fit does."""
    learning_rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for step in range(plan.max_steps):
            learning_rates.append(optimizers[0].param_groups[0]["lr"])
            epoch_ends = (step + 1) % plan.steps_per_epoch == 0
            for config in schedulers:
                due = config.interval == "step" or epoch_ends
                if due and (step + 1) % config.frequency == 0:
                    config.scheduler.step()
    return learning_rates


def save_lr_curve(plan: TrainingPlan, optimizers: list, schedulers: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learning_rates = planned_learning_rates(plan, optimizers, schedulers)
    figure, axes = plt.subplots(figsize=(7, 3.5))
    boundaries = [epoch * plan.steps_per_epoch for epoch in range(1, plan.epochs)]
    draw_lr(axes, list(range(1, plan.max_steps + 1)), learning_rates, boundaries)
    axes.set_title(f"{plan.max_steps} steps, warmup {plan.warmup_steps}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"LR curve saved to {path}")
