"""The ``plan`` command: the training plan for any world size, without training.

A data module that can say what each rank's loader yields at a given world size
(``train_batches_per_rank``, as ``StreamingDataModule`` does with litdata's own length
rule) is asked; any other is measured as Lightning's ``DistributedSampler`` would split
its dataset. ``limit_train_batches`` goes through Lightning's own parser, so the dry
run and a real fit derive the same plan. ``--lr_curve`` calls the module's own
``configure_optimizers`` against the plan and steps its scheduler, so it draws the
curve any module (OneCycleLR included) would follow.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace
from typing import Any

from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage

from train_template.errors import UserError
from train_template.launch import requested_world_size
from train_template.plan import TrainingPlan, format_plan
from train_template.planning import TrainingPlanCallback


def run_plan(config: Any, datamodule: Any, model: Any, config_init: Any) -> None:
    trainer = config.trainer
    num_nodes = int(trainer.num_nodes)
    world_size = requested_world_size(trainer.devices, num_nodes)
    if world_size is None:
        raise UserError(
            f"--trainer.devices={trainer.devices}: the dry run needs a device count, e.g. --trainer.devices 8"
        )
    devices = world_size // num_nodes
    per_rank, batch_size = per_rank_layout(datamodule, world_size)
    length = max(batches for batches, _ in per_rank)  # short ranks are padded to it
    limit = 1.0 if trainer.limit_train_batches is None else trainer.limit_train_batches
    batches = _parse_num_batches(RunningStage.TRAINING, length, limit)
    max_epochs = trainer.max_epochs
    if max_epochs is None:  # Lightning's own default
        max_epochs = 1000 if trainer.max_steps == -1 else -1
    plan_callback: TrainingPlanCallback = config_init.plan
    plan = plan_callback.make(
        batches_per_epoch=int(batches),
        batch_size=batch_size,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        devices=devices,
        num_nodes=num_nodes,
        rank_samples=[samples for _, samples in per_rank],
        tokens_per_sample=getattr(datamodule, "tokens_per_sample", None),
        max_epochs=max_epochs,
        max_steps=trainer.max_steps,
    )
    print(plan.to_json() if config.json else format_plan(plan))
    if config.lr_curve:
        save_lr_curve(plan, model, config.lr_curve)


def per_rank_layout(datamodule: Any, world_size: int) -> tuple[list[tuple[int, int]], int]:
    """(batches, samples) of every rank at ``world_size``, and the batch size."""
    if hasattr(datamodule, "train_batches_per_rank"):
        return datamodule.train_batches_per_rank(world_size), int(datamodule.batch_size)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batch_size = getattr(loader, "batch_size", None)
    try:
        size = len(loader.dataset)
    except TypeError:
        raise UserError("the dry run needs a sized train dataset (a map-style dataset)") from None
    if batch_size is None:
        raise UserError("the train loader has no batch_size: the plan needs a batched loader")
    # Lightning's DistributedSampler pads every rank to ceil(size / world_size) samples.
    samples = math.ceil(size / world_size)
    full, partial = divmod(samples, batch_size)
    batches = full + int(partial > 0 and not loader.drop_last)
    return [(batches, samples)] * world_size, int(batch_size)


def planned_learning_rates(plan: TrainingPlan, model: Any) -> list[float]:
    """The LR of every optimizer step, from the module's own ``configure_optimizers``
    and scheduler, given a stand-in trainer that answers what a fit's would."""
    from lightning.pytorch.core.optimizer import (
        _configure_optimizers,
        _configure_schedulers_automatic_opt,
    )

    stand_in = SimpleNamespace(
        estimated_stepping_batches=plan.max_steps,
        training_plan=plan,
        max_epochs=plan.epochs,
        max_steps=plan.max_steps,
        num_training_batches=plan.batches_per_epoch,
        accumulate_grad_batches=plan.accumulate_grad_batches,
        world_size=plan.world_size,
        num_devices=plan.devices,
        num_nodes=plan.num_nodes,
    )
    model._trainer = stand_in
    try:
        optimizers, schedulers, monitor = _configure_optimizers(model.configure_optimizers())
        schedulers = _configure_schedulers_automatic_opt(schedulers, monitor)
    except AttributeError as error:
        raise UserError(
            f"--lr_curve: configure_optimizers reads a trainer setting the dry run does not "
            f"have ({error}): draw the curve from a fit's metrics.csv instead"
        ) from None
    finally:
        model._trainer = None
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


def save_lr_curve(plan: TrainingPlan, model: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learning_rates = planned_learning_rates(plan, model)
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.plot(range(1, plan.max_steps + 1), learning_rates)
    for epoch in range(1, plan.epochs):
        axes.axvline(epoch * plan.steps_per_epoch + 0.5, color="0.85", linewidth=0.8)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")
    axes.set_title(f"{plan.max_steps} steps, warmup {plan.warmup_steps}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"LR curve saved to {path}")
