"""Every option group the template adds to the command line, in one place.

Each dataclass is one ``--<group>.*`` block of ``train.py`` (LightningCLI reads the field
docstrings as ``--help``); ``--checkpoint.*`` is ``checkpointing.RunCheckpoint`` itself,
and ``--trainer/--model/--data.*`` belong to Lightning and to your classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from train_template.errors import PlanError

# The global order's defaults (order.py): a window of 64 blocks is a full shuffle of any
# dataset of up to 64 chunks (or 64 Ki samples without chunks); docs/benchmarks.md
# measures what it keeps of one beyond.
SHUFFLE_WINDOW = 64
SHUFFLE_BLOCK = 1024


@dataclass
class PlanOptions:
    """The training plan's own inputs (``--plan.*``); the LR curve is ``--lr_schedule.*``."""

    max_samples: int | None = None
    """Train on this many samples (all ranks together) instead of ``--trainer.max_epochs``;
    rounded up to whole optimizer steps."""
    max_tokens: int | None = None
    """Train on this many tokens (all ranks together; token datasets); rounded up to whole
    optimizer steps."""
    global_batch_size: int | None = None
    """Samples per optimizer step, all ranks together: the accumulation is derived from the
    world size and the per-device batch (``--trainer.accumulate_grad_batches`` then unset)."""
    scale_partial_accumulation: bool = True
    """Give the epoch's last, short accumulation window the mean gradient of the batches it
    holds (Lightning divides its loss by the full window size, Lightning #19987)."""
    shuffle_window: int | None = SHUFFLE_WINDOW
    """Global sample order: blocks (a dataset's chunks) shuffled together per epoch; a rank
    reads about two windows of blocks at a time. ``null``: one permutation of all samples
    (the order of checkpoints written before windows; memory grows with the dataset)."""
    shuffle_block: int = SHUFFLE_BLOCK
    """Global sample order, datasets without chunks: consecutive indices per block."""

    def check_order(self) -> None:
        """The global order's window and block: whole positive numbers."""
        for name in ("shuffle_window", "shuffle_block"):
            value = getattr(self, name)
            if value is not None and value < 1:
                hint = " (or null: one permutation of all samples)" if "window" in name else ""
                raise PlanError(f"--plan.{name}={value}: must be at least 1{hint}")


@dataclass(frozen=True)
class WarmupSetting:
    """Warmup in optimizer steps, epochs or a fraction of the run; converted to steps."""

    steps: int | None = None
    fraction: float | None = None
    epochs: float | None = None

    def to_steps(self, max_steps: int, steps_per_epoch: int | None) -> int:
        """Most specific unit wins: steps, then epochs, then fraction (a config's default
        fraction stays overridable from the command line)."""
        if self.steps is not None:
            if self.steps < 0:
                raise PlanError(
                    f"--lr_schedule.warmup_steps={self.steps} is negative: use 0 or more"
                )
            return self.steps
        if self.epochs is not None:
            if self.epochs < 0:
                raise PlanError(
                    f"--lr_schedule.warmup_epochs={self.epochs} is negative: use 0 or more"
                )
            if steps_per_epoch is None:
                raise PlanError(
                    f"--lr_schedule.warmup_epochs={self.epochs}: the train stream has no "
                    "epochs (no length): use --lr_schedule.warmup_steps or warmup_fraction"
                )
            return math.ceil(self.epochs * steps_per_epoch)
        if self.fraction is not None:
            if not 0 <= self.fraction < 1:
                raise PlanError(
                    f"--lr_schedule.warmup_fraction={self.fraction} is outside [0, 1): "
                    "use a fraction of the run, e.g. 0.05"
                )
            return int(round(self.fraction * max_steps))
        return 0


@dataclass
class LRSchedule:
    """The learning-rate curve of the run (``--lr_schedule.*``); its length comes from the
    training plan. Used by modules that return ``planned_optimization`` (``schedule.py``)."""

    warmup_steps: int | None = None
    """Linear warmup, in optimizer steps (wins over epochs and fraction)."""
    warmup_epochs: float | None = None
    """Linear warmup, in epochs (rounded up to whole steps; wins over fraction)."""
    warmup_fraction: float | None = None
    """Linear warmup, as a fraction of all optimizer steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to ``final_lr_factor``, or constant."""
    final_lr_factor: float = 0.05
    """LR at the last optimizer step, as a fraction of the optimizer's base LR."""
    warmup_start_factor: float = 0.01
    """LR at the first warmup step, as a fraction of the base LR."""
    stable_fraction: float = 0.0
    """Warmup-stable-decay: fraction of the post-warmup steps held at the peak LR."""

    @property
    def warmup(self) -> WarmupSetting:
        return WarmupSetting(self.warmup_steps, self.warmup_fraction, self.warmup_epochs)


@dataclass
class PreemptionOptions:
    """How a SIGUSR1/SIGTERM is handled (``--preemption.*``)."""

    check_every_n_steps: int = 5
    """With several processes, agree on a received signal every this many optimizer steps
    (one small all-reduce each time). A single process checks after every optimizer step."""


@dataclass
class DistributedOptions:
    """How long ranks wait for each other (``--distributed.*``)."""

    timeout_s: float = 300.0
    """The longest any rank waits for a peer in a collective (the process group's timeout;
    NCCL's watchdog timeout on GPUs). Then the surviving ranks exit non-zero."""
