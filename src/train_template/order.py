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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader, IterableDataset


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
        if needed > len(order):  # complete the last window from the epoch's start
            order = np.concatenate([order, order[: needed - len(order)]])
        return order[:needed]

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
    accumulate, remainder = divmod(global_batch_size, world_size * batch_size)
    if remainder or accumulate < 1:
        raise ValueError(f"{global_batch_size} is not a multiple of {world_size} x {batch_size}")
    return accumulate


class GlobalOrderStream(IterableDataset):
    """This rank's collated micro-batches of a :class:`GlobalOrder`, from a map-style
    ``source`` (``source[i]`` is sample ``i``); for ``DataLoader(stream, batch_size=None)``.

    An ``IterableDataset`` so that Lightning leaves it alone (no sampler injected); with
    loader workers, worker ``w`` of ``n`` builds micro-batches ``w, w + n, ...``, which
    torch's loader hands out in turn: the same order as one process. ``start_step``
    (after a resume) applies to the epoch it was set for; ``set_epoch`` moves on.
    """

    def __init__(
        self,
        source,
        order: GlobalOrder,
        world_size: int,
        rank: int,
        batch_size: int,
        collate,
        epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        self.source = source
        self.order = order
        self.world_size = world_size
        self.rank = rank
        self.batch_size = batch_size
        self.collate = collate
        self.accumulate = accumulation_of(order.global_batch_size, world_size, batch_size)
        self.epoch = epoch
        self.start_step = start_step

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_step = epoch, 0

    def __len__(self) -> int:
        return self.order.steps_per_epoch * self.accumulate  # the whole epoch, resumed or not

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.order.rank_batches(
            self.epoch, self.world_size, self.rank, self.batch_size, self.start_step
        )
        for position, indices in enumerate(batches):
            if position % workers == worker:
                yield self.collate([self.source[int(i)] for i in indices])


class GlobalOrderLoader(DataLoader):
    """The DataLoader of a :class:`GlobalOrderStream`: resumable without a state of its own.

    Its position is the trainer's global step (restored with the checkpoint), so there is
    nothing to save; saying so keeps Lightning from warning that a mid-epoch checkpoint of
    this loader cannot resume.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
