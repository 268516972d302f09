"""How the data is laid out over ranks: each rank's batches and samples per epoch, and the
accumulation that makes a global batch. Pure arithmetic, like ``plan.py``, which reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from train_template.errors import PlanError


@dataclass(frozen=True)
class TrainLayout:
    """What every rank's own train loader yields per epoch: the one layout protocol.

    Made only by :func:`train_layout`. A data module that knows it without building a
    loader (``StreamingDataModule``) returns it from ``train_layout(world_size)``; any
    other data source is measured (``plan_from_data.measured_layout``). ``order`` holds
    the data settings that fix which samples come in which order (seed, shuffle, ...): a
    resume must keep them.
    """

    batch_size: int
    # Per rank, before limit_train_batches (None: a stream without a length).
    rank_batches: tuple[int | None, ...]
    rank_samples: tuple[int | None, ...]  # the rank's own samples (padding not counted)
    tokens_per_sample: int | None = None
    order: tuple[tuple[str, object], ...] = ()

    @property
    def world_size(self) -> int:
        return len(self.rank_batches)

    @property
    def batches_per_rank(self) -> int | None:
        """Every rank runs the longest rank's count: short ranks are padded to it."""
        if any(batches is None for batches in self.rank_batches):
            return None
        return max(self.rank_batches)


def batches_of(samples: int | None, batch_size: int, drop_last: bool) -> int | None:
    """A loader's batches for ``samples`` samples: the one batches-per-rank rule (torch's
    ``BatchSampler``, litdata's ``StreamingDataLoader``); None for a stream without a length."""
    if samples is None:
        return None
    full, partial = divmod(samples, batch_size)
    return full + int(partial > 0 and not drop_last)


def train_layout(
    batch_size: int,
    rank_samples: Sequence[int | None],
    *,
    drop_last: bool = False,
    rank_batches: Sequence[int | None] | None = None,
    tokens_per_sample: int | None = None,
    order: tuple[tuple[str, object], ...] = (),
) -> TrainLayout:
    """Every :class:`TrainLayout` is made here: each rank's batches from its samples by
    :func:`batches_of`, unless the loader says them (``rank_batches``: the global order's
    whole global batches, a loader's own length)."""
    if rank_batches is None:
        rank_batches = [batches_of(samples, batch_size, drop_last) for samples in rank_samples]
    return TrainLayout(
        batch_size=batch_size,
        rank_batches=tuple(rank_batches),
        rank_samples=tuple(rank_samples),
        tokens_per_sample=tokens_per_sample,
        order=tuple(order),
    )


def accumulation_for(
    global_batch_size: int, world_size: int, batch_size: int, accumulate_grad_batches: int | None
) -> int:
    """The accumulation that makes ``global_batch_size`` at this world size and per-device
    batch (``--plan.global_batch_size``); one line naming what works when none does."""
    per_step = world_size * batch_size
    if global_batch_size < 1 or global_batch_size % per_step:
        sizes = [
            b for b in range(1, global_batch_size + 1) if global_batch_size % (world_size * b) == 0
        ]
        # The largest that fits where this batch did (memory), else the smallest there is.
        fitting = [b for b in sizes if b <= batch_size]
        suggestion = fitting[-1] if fitting else (sizes[0] if sizes else None)
        hint = (
            f"use a --data.batch_size that divides it over {world_size} rank(s), e.g. {suggestion}"
            if suggestion
            else f"use a global batch that {world_size} rank(s) can share"
        )
        raise PlanError(
            f"--plan.global_batch_size={global_batch_size} is not a whole number of "
            f"world size x batch per device = {world_size} x {batch_size} = {per_step}: {hint}"
        )
    accumulate = global_batch_size // per_step
    if accumulate_grad_batches not in (None, 1, accumulate):
        raise PlanError(
            f"--plan.global_batch_size={global_batch_size} needs accumulation {accumulate} at "
            f"world size {world_size} and batch {batch_size}, but "
            f"--trainer.accumulate_grad_batches={accumulate_grad_batches}: set only one of them"
        )
    return accumulate


def accumulation_window_size(batch_idx: int, batches_per_epoch: int, accumulate: int) -> int:
    """How many batches the accumulation window containing ``batch_idx`` really has.

    Every window is ``accumulate`` batches long except possibly the last one of the
    epoch, which Lightning closes early on the final batch.
    """
    window_start = (batch_idx // accumulate) * accumulate
    return min(accumulate, batches_per_epoch - window_start)
