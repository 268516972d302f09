"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay (or WSD).

The schedule is a multiplier of the optimizer's base LR indexed by the optimizer step
(0-based), used through ``torch.optim.lr_scheduler.LambdaLR``. Its length is unknown
when ``configure_optimizers`` runs (the loader does not exist yet), so the plan
fills in ``warmup_steps`` and ``total_steps`` later with :meth:`PlannedLRLambda.set_length`.

Step ``s`` of ``total_steps`` uses multiplier ``lr_lambda(s)``: the first step uses
``warmup_start_factor`` (or 1.0 without warmup) and the last step, ``s = total - 1``,
uses exactly ``final_lr_factor``. Past the end the multiplier stays at the final value,
so a scheduler can never run past its end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class LRSchedule:
    """Shape of the learning-rate curve; its length comes from the training plan."""

    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to ``final_lr_factor``, or constant."""
    final_lr_factor: float = 0.05
    """LR at the last optimizer step, as a fraction of the optimizer's base LR."""
    warmup_start_factor: float = 0.01
    """LR at the first warmup step, as a fraction of the base LR."""
    stable_fraction: float = 0.0
    """Warmup-stable-decay: fraction of the post-warmup steps held at the peak LR."""


class PlannedLRLambda:
    """Callable object (not a lambda) so LambdaLR saves its length in checkpoints."""

    def __init__(self, schedule: LRSchedule) -> None:
        self.decay = schedule.decay
        self.final_lr_factor = schedule.final_lr_factor
        self.warmup_start_factor = schedule.warmup_start_factor
        self.stable_fraction = schedule.stable_fraction
        self.warmup_steps = 0
        self.total_steps: int | None = None

    def set_length(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if self.total_steps is None:  # before the plan exists: only step 0 is ever evaluated
            return self.warmup_start_factor if self.warmup_steps else 1.0
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
