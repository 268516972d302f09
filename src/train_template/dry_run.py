"""The ``plan`` command: the training plan for any world size, without training.

It calls the same ``planning.plan_run`` a fit calls at setup, with the config's numbers
instead of a Trainer's: a data module with ``train_layout(world_size)`` (as
``StreamingDataModule``, with litdata's own length rule) is asked, any other is measured
as Lightning's ``DistributedSampler`` would split it. ``--ckpt_path`` prints the plan a resume of that checkpoint would use at the given world
size (in the global sample order: its global batch, the accumulation re-derived) and the
step it continues from, or the one-line refusal a fit would give. ``--lr_curve`` calls the module's own
``configure_optimizers`` under a real (unlaunched) Trainer that holds the plan and steps
its scheduler, so it draws the curve any module (OneCycleLR included) would follow.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

from train_template import seam
from train_template.errors import UserError
from train_template.launch import requested_world_size
from train_template.plan import TrainingPlan, format_plan
from train_template.planning import PlannedTrainer, check_resume, is_elastic, plan_run
from train_template.report import draw_lr
from train_template.schedule import LRSchedule, is_planned_scheduler


def run_plan(config: Any, datamodule: Any, model: Any, config_init: Any) -> None:
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
    options, accumulate, resumed = config_init.plan, trainer.accumulate_grad_batches, None
    if config.ckpt_path:  # the plan a resume of this checkpoint would use
        resumed = resumed_from(config.ckpt_path, config.checkpoint.dirpath)
        saved = resumed["plan"]
        if is_elastic(saved):  # the checkpoint's global batch wins on any layout
            options = dataclasses.replace(options, global_batch_size=saved["global_batch_size"])
            accumulate = 1
    plan = plan_run(
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
    if resumed is not None:
        check_resume(resumed["plan"], plan)  # the same one-line refusal a fit would give
        step = resumed["global_step"]
        where = ""
        if plan.steps_per_epoch:
            where = f" (epoch {step // plan.steps_per_epoch}, step {step % plan.steps_per_epoch})"
        print(f"resuming {resumed['path']} at global step {step}{where}")
    if config.json:
        print(plan.to_json())
    optimizers, schedulers = configured(plan, config_init.lr_schedule, model)
    planned = any(is_planned_scheduler(c.scheduler) for c in schedulers)
    if not config.json:
        print(format_plan(plan, planned_schedule=planned))
    if config.lr_curve:
        save_lr_curve(plan, optimizers, schedulers, config.lr_curve)


def resumed_from(ckpt_path: str, checkpoint_dir: str) -> dict:
    """The saved plan and global step of ``--ckpt_path`` (``last``/``auto``/a file)."""
    from train_template.checkpointing import read_checkpoint, resolve_ckpt_path

    path = resolve_ckpt_path(ckpt_path, checkpoint_dir, announce=lambda *_: None)
    if path is None:
        raise UserError(f"--ckpt_path {ckpt_path}: there is no checkpoint in {checkpoint_dir}")
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("callbacks", {}).get("RunMachinery", {}).get("plan")
    if saved is None:
        raise UserError(f"--ckpt_path {path}: the checkpoint holds no training plan")
    return {"path": path, "plan": saved, "global_step": int(checkpoint["global_step"])}


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
    seam.release_step_limit(trainer, plan.epochs)
    try:
        return seam.configured_schedulers(model, trainer)
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
