"""The learning-rate curve: linear warmup, then cosine, linear or constant decay (or WSD).

The whole curve is configured in one place, ``--lr_schedule.*`` (this ``LRSchedule``):
warmup (in steps, epochs or a fraction of the run) and the decay after it. Its length
is the training plan's ``max_steps``; the plan turns the warmup into ``warmup_steps``.
Any module uses it from ``configure_optimizers``::

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return planned_optimization(optimizer, self.trainer)

The multiplier of the base LR is indexed by the optimizer step (0-based), through
``torch.optim.lr_scheduler.LambdaLR``. Step ``s`` of ``total_steps`` uses
``lr_lambda(s)``: the first step uses ``warmup_start_factor`` (or 1.0 without warmup)
and the last step, ``s = total - 1``, exactly ``final_lr_factor``. Past the end the
multiplier stays at the final value, so a scheduler can never run past its end.
"""

from __future__ import annotations

import math
from typing import Any

from train_template.options import LRSchedule


def planned_lr_scheduler(optimizer: Any, trainer: Any, schedule: LRSchedule | None = None) -> dict:
    """The ``lr_scheduler`` entry for ``configure_optimizers``: the run's curve
    (``--lr_schedule.*``, or ``schedule``) stepped every optimizer step, as long as the
    training plan, with the plan's warmup.

    Without the template's trainer (a plain ``lightning.Trainer``) the length is
    Lightning's ``estimated_stepping_batches`` and only a warmup in steps or a fraction applies.
    """
    from torch.optim.lr_scheduler import LambdaLR

    plan = getattr(trainer, "training_plan", None)
    schedule = schedule or getattr(trainer, "lr_schedule", None) or LRSchedule()
    total_steps = int(trainer.estimated_stepping_batches)
    if plan is not None:
        warmup_steps = plan.warmup_steps
    else:
        warmup_steps = schedule.warmup.to_steps(total_steps, steps_per_epoch=total_steps)
    lr_lambda = PlannedLRLambda(schedule, warmup_steps, total_steps)
    return {"scheduler": LambdaLR(optimizer, lr_lambda), "interval": "step", "frequency": 1}


def planned_optimization(optimizer: Any, trainer: Any) -> dict:
    """What ``configure_optimizers`` returns for ``optimizer`` on the run's planned LR curve."""
    return {"optimizer": optimizer, "lr_scheduler": planned_lr_scheduler(optimizer, trainer)}


def is_planned_scheduler(scheduler: Any) -> bool:
    """True for a scheduler made by :func:`planned_lr_scheduler` (the plan's warmup applies)."""
    return any(isinstance(f, PlannedLRLambda) for f in getattr(scheduler, "lr_lambdas", ()))


class PlannedLRLambda:
    """Callable object (not a lambda) so LambdaLR saves its length in checkpoints."""

    def __init__(self, schedule: LRSchedule, warmup_steps: int, total_steps: int) -> None:
        self.decay = schedule.decay
        self.final_lr_factor = schedule.final_lr_factor
        self.warmup_start_factor = schedule.warmup_start_factor
        self.stable_fraction = schedule.stable_fraction
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            final_lr_factor=self.final_lr_factor,
            warmup_start_factor=self.warmup_start_factor,
            stable_fraction=self.stable_fraction,
        )


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    decay: str = "cosine",
    final_lr_factor: float = 0.0,
    warmup_start_factor: float = 0.0,
    stable_fraction: float = 0.0,
) -> float:
    """Multiplier of the base LR used by 0-based optimizer step ``step``."""
    step = min(max(step, 0), total_steps - 1)
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    if decay == "constant":
        return 1.0
    decay_steps = total_steps - 1 - warmup_steps  # last step reaches the final LR exactly
    stable_steps = int(stable_fraction * decay_steps)
    into_decay = step - warmup_steps - stable_steps
    if into_decay <= 0:
        return 1.0 if decay_steps > 0 else final_lr_factor
    progress = into_decay / (decay_steps - stable_steps)
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return final_lr_factor + (1.0 - final_lr_factor) * shape
