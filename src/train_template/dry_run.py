"""The ``plan`` command: the training plan for any world size, without training.

The per-rank loader length comes from litdata itself (``ShardDataModule.
train_batches_per_rank``) and ``limit_train_batches`` goes through Lightning's own
parser, so the dry run and a real fit derive the same plan.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage

from train_template.callbacks import TrainingPlanCallback
from train_template.errors import UserError
from train_template.launch import requested_world_size
from train_template.plan import format_plan
from train_template.schedule import PlannedLRLambda


def run_plan(config: Any, datamodule: Any, model: Any, config_init: Any) -> None:
    trainer = config.trainer
    num_nodes = int(trainer.num_nodes)
    world_size = requested_world_size(trainer.devices, num_nodes)
    if world_size is None:
        raise UserError(
            f"--trainer.devices={trainer.devices}: the dry run needs a device count, e.g. --trainer.devices 8"
        )
    devices = world_size // num_nodes
    per_rank = datamodule.train_batches_per_rank(world_size)
    length = max(batches for batches, _ in per_rank)  # short ranks are padded to it
    limit = 1.0 if trainer.limit_train_batches is None else trainer.limit_train_batches
    batches = _parse_num_batches(RunningStage.TRAINING, length, limit)
    max_epochs = trainer.max_epochs
    if max_epochs is None:  # Lightning's own default
        max_epochs = 1000 if trainer.max_steps == -1 else -1
    plan_callback: TrainingPlanCallback = config_init.plan
    plan = plan_callback.make(
        batches_per_epoch=int(batches),
        batch_size=datamodule.batch_size,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        devices=devices,
        num_nodes=num_nodes,
        rank_samples=[samples for _, samples in per_rank],
        max_epochs=max_epochs,
        max_steps=trainer.max_steps,
    )
    print(plan.to_json() if config.json else format_plan(plan))
    if config.lr_curve:
        save_lr_curve(plan, model, config.lr_curve)


def save_lr_curve(plan, model, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_lr = model.optimizer_factory(model.parameters()).param_groups[0]["lr"]
    schedule = PlannedLRLambda(model.lr_schedule)
    schedule.set_length(plan.warmup_steps, plan.max_steps)
    steps = list(range(plan.max_steps))
    lrs = [base_lr * schedule(step) for step in steps]
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.plot([s + 1 for s in steps], lrs)
    for epoch in range(1, plan.epochs):
        axes.axvline(epoch * plan.steps_per_epoch + 0.5, color="0.85", linewidth=0.8)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")
    axes.set_title(f"{plan.max_steps} steps, warmup {plan.warmup_steps}, {schedule.decay} decay")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"LR curve saved to {path}")
