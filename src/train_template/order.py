"""The sample order of a run, defined over global positions: the same on every layout.

Epoch ``e`` is one permutation of the sample indices (seeded by the data seed and ``e``),
cut into global batches of ``global_batch_size`` positions; optimizer step ``s`` of the
epoch trains on positions ``[s * G, (s + 1) * G)``. Each layout (world size ``W``, batch
per device ``b``, accumulation ``a``, with ``W * b * a = G``) reads its share of that window:
micro-batch ``m`` of rank ``r`` is positions ``s * G + m * W * b + r * b + [0, b)``. So the
set of samples of every optimizer step is a property of the run, not of the layout: a run
resumed on another number of devices trains every later step on exactly the samples the
uninterrupted run had, in the interrupted epoch and every later one.

Every epoch holds the same number of whole global batches on every layout: without
``drop_last`` the last window is completed with the epoch's first samples (they are seen
twice that epoch), with it the tail of fewer than ``G`` samples waits for another epoch.
Pure numpy arithmetic; the cost is one permutation of ``num_samples`` int64 per rank
(8 bytes a sample) and reads across all chunks (no chunk locality).

The option that selects it is ``--data.global_order`` (default on; unrelated to torchrun's
"elastic" mode, which restarts workers on the nodes left: this order is what lets such a
restart continue exactly). :class:`GlobalOrderSampler` is one rank's share as a torch
``Sampler``: ``order_loader.py`` puts
it where Lightning would put its ``DistributedSampler``, for any map-style train loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

from train_template.errors import PlanError
from train_template.layout import TrainLayout, accumulation_for, train_layout


@dataclass(frozen=True)
class GlobalOrder:
    """Which samples every optimizer step of every epoch trains on."""

    num_samples: int
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices by global position, ``steps_per_epoch * G`` of them."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        needed = self.steps_per_epoch * self.global_batch_size
        # Complete the last window from the epoch's start, cyclically: an epoch smaller than
        # the window's shortfall repeats its samples (np.resize tiles the order).
        return np.resize(order, needed) if needed > len(order) else order[:needed]

    def step_samples(self, epoch: int, step: int) -> np.ndarray:
        """The samples optimizer step ``step`` (0-based, in the epoch) trains on."""
        start = step * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def rank_batches(
        self, epoch: int, world_size: int, rank: int, batch_size: int, start_step: int = 0
    ) -> Iterator[list[int]]:
        """This rank's micro-batches from ``start_step`` to the end of the epoch."""
        accumulate = accumulation_of(self.global_batch_size, world_size, batch_size)
        order = self.epoch_order(epoch)
        per_micro = world_size * batch_size
        for step in range(start_step, self.steps_per_epoch):
            for micro in range(accumulate):
                first = step * self.global_batch_size + micro * per_micro + rank * batch_size
                yield order[first : first + batch_size].tolist()


def accumulation_of(global_batch_size: int, world_size: int, batch_size: int) -> int:
    """The accumulation of a layout in this order: the plan's one rule
    (``plan.accumulation_for``; a ``PlanError`` naming a batch size that works)."""
    return accumulation_for(global_batch_size, world_size, batch_size, None)


class GlobalOrderSampler(Sampler[int]):
    """One rank's sample indices of a :class:`GlobalOrder`, micro-batch after micro-batch.

    A ``DataLoader``'s ``BatchSampler(this, batch_size)`` cuts them back into the rank's
    micro-batches (the count is always whole batches, so its ``drop_last`` changes
    nothing); with loader workers each worker fetches whole batches in turn, the order of
    one process. The sampler needs no saved state: its position is the run's, set from
    the trainer's restored global step (``start_step``, for the epoch it was made for).
    Lightning calls ``set_epoch`` at every epoch start, as it does on a
    ``DistributedSampler``; a new epoch starts at its first step.
    """

    def __init__(
        self,
        order: GlobalOrder,
        world_size: int,
        rank: int,
        batch_size: int,
        epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        self.order = order
        self.world_size = world_size
        self.rank = rank
        self.batch_size = batch_size
        self.accumulate = accumulation_of(order.global_batch_size, world_size, batch_size)
        self.epoch = epoch
        self.start_step = start_step

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_step = epoch, 0

    def __len__(self) -> int:
        """The whole epoch's samples of this rank, resumed or not (Lightning counts the
        epoch's batches from its restored counters)."""
        return self.order.steps_per_epoch * self.accumulate * self.batch_size

    def __iter__(self) -> Iterator[int]:
        batches = self.order.rank_batches(
            self.epoch, self.world_size, self.rank, self.batch_size, self.start_step
        )
        for batch in batches:
            yield from batch


def global_order_layout(
    order: GlobalOrder,
    world_size: int,
    batch_size: int,
    tokens_per_sample: int | None = None,
) -> TrainLayout:
    """What every rank trains on per epoch in ``order``: whole global batches, the same
    batch count on every rank; ``rank_samples`` splits the epoch's distinct samples."""
    accumulate = accumulation_of(order.global_batch_size, world_size, batch_size)
    if order.steps_per_epoch == 0:
        raise PlanError(
            f"the train split has {order.num_samples} samples, fewer than one global batch of "
            f"{order.global_batch_size} (world size {world_size} x --data.batch_size "
            f"{batch_size} x accumulation {accumulate}) with --data.drop_last true: use a "
            "smaller batch or accumulation, fewer devices, more data, or --data.drop_last false"
        )
    batches = order.steps_per_epoch * accumulate
    distinct = min(order.num_samples, order.steps_per_epoch * order.global_batch_size)
    shares = tuple(distinct // world_size + (r < distinct % world_size) for r in range(world_size))
    settings = (
        ("shuffle", order.shuffle),
        ("drop_last", order.drop_last),
        ("seed", order.seed),
        ("global_order", True),
    )
    return train_layout(
        batch_size,
        shares,
        rank_batches=(batches,) * world_size,
        tokens_per_sample=tokens_per_sample,
        order=settings,
    )
