"""The sample order of a run, defined over global positions: the same on every layout.

Epoch ``e`` is a seeded shuffle of the sample indices (seeded by the data seed and ``e``),
cut into global batches of ``global_batch_size`` positions; optimizer step ``s`` of the
epoch trains on positions ``[s * G, (s + 1) * G)``. Each layout (world size ``W``, batch
per device ``b``, accumulation ``a``, with ``W * b * a = G``) reads its share of that window:
micro-batch ``m`` of rank ``r`` is positions ``s * G + m * W * b + r * b + [0, b)``. So the
set of samples of every optimizer step is a property of the run, not of the layout: a run
resumed on another number of devices trains every later step on exactly the samples the
uninterrupted run had, in the interrupted epoch and every later one.

The shuffle is blockwise, so that its cost and its reads do not grow with the dataset:
the indices fall into blocks (a dataset's chunks, whose items are stored together, or
``shuffle_block`` consecutive indices for a dataset without chunks); an epoch permutes
the blocks, cuts the permuted blocks into windows of ``shuffle_window`` blocks and
permutes the items within each window. A position maps to its window by one binary
search, and only the windows a rank is reading are ever built: memory per rank is one
int64 per block plus one window's items, and a rank jumps to any step without building
its epoch. At any time all ranks read the blocks of one or two windows: a node downloads
each remote chunk about once per epoch when its cache holds two windows. A window of all
blocks is a full shuffle; ``shuffle_window=None`` is one permutation of every index, the
order of checkpoints written before windows existed (kept so that they resume in it).

Every epoch holds the same number of whole global batches on every layout: without
``drop_last`` the last global batch is completed with the epoch's first samples (they are seen
twice that epoch), with it the tail of fewer than ``G`` samples waits for another epoch.
Pure numpy arithmetic.

The option that selects it is ``--data.global_order`` (default on; unrelated to torchrun's
"elastic" mode, which restarts workers on the nodes left: this order is what lets such a
restart continue exactly); ``--plan.shuffle_window`` and ``--plan.shuffle_block`` shape
it. :class:`GlobalOrderSampler` is one rank's share as a torch ``Sampler``:
``order_loader.py`` puts it where Lightning would put its ``DistributedSampler``, for any
map-style train loader.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Sampler

from train_template.errors import PlanError
from train_template.layout import TrainLayout, accumulation_for, train_layout
from train_template.options import SHUFFLE_BLOCK, SHUFFLE_WINDOW

_RNG_BLOCKS, _RNG_WINDOW = 1, 2  # the two streams of a windowed epoch's seed
# A rank's sampler works out this many of its positions at once (32 KB of int64).
RANK_POSITIONS_AT_ONCE = 4096


@dataclass(frozen=True)
class GlobalOrder:
    """Which samples every optimizer step of every epoch trains on.

    ``block_sizes``: the items of each block in index order (a dataset's chunks), or one
    size for blocks of consecutive indices. ``shuffle_window``: blocks shuffled together;
    None: one permutation of all indices."""

    num_samples: int
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    shuffle_window: int | None = SHUFFLE_WINDOW
    block_sizes: Sequence[int] | int = SHUFFLE_BLOCK
    _built: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.block_sizes, int):
            sizes = np.asarray(self.block_sizes, dtype=np.int64)
            if sizes.sum() != self.num_samples or (sizes < 0).any():
                raise ValueError(
                    f"blocks of {int(sizes.sum())} items for a dataset of {self.num_samples}"
                )

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """The sample indices at global positions ``[start, stop)`` of ``epoch``. Positions
        past the dataset wrap to the epoch's start (the completed last global batch). Read
        only: it may be a view of the order's cached window."""
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        first = start % self.num_samples
        if stop - start <= self.num_samples - first:  # no wrap: every batch but the last
            return self._unwrapped(epoch, first, first + stop - start)
        parts = []
        while start < stop:
            first = start % self.num_samples
            take = min(stop - start, self.num_samples - first)
            parts.append(self._unwrapped(epoch, first, first + take))
            start += take
        return np.concatenate(parts)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices by global position, ``steps_per_epoch * G`` of them (the whole
        epoch at once: for tests and small data; a rank reads :meth:`indices`)."""
        return self.indices(epoch, 0, self.steps_per_epoch * self.global_batch_size)

    def step_samples(self, epoch: int, step: int) -> np.ndarray:
        """The samples optimizer step ``step`` (0-based, in the epoch) trains on."""
        start = step * self.global_batch_size
        return self.indices(epoch, start, start + self.global_batch_size)

    def rank_batches(
        self, epoch: int, world_size: int, rank: int, batch_size: int, start_step: int = 0
    ) -> Iterator[list[int]]:
        """This rank's micro-batches from ``start_step`` to the end of the epoch, worked out
        for about ``RANK_POSITIONS_AT_ONCE`` of its positions at a time (one gather instead
        of a lookup per micro-batch: the sampler runs on every training step)."""
        accumulate = accumulation_of(self.global_batch_size, world_size, batch_size)
        # The rank's positions within one optimizer step: micro m, item i.
        micro = np.arange(accumulate, dtype=np.int64)[:, None] * (world_size * batch_size)
        in_step = (micro + rank * batch_size + np.arange(batch_size)).ravel()
        steps_at_once = max(1, RANK_POSITIONS_AT_ONCE // len(in_step))
        for first in range(start_step, self.steps_per_epoch, steps_at_once):
            steps = np.arange(first, min(first + steps_at_once, self.steps_per_epoch))
            positions = (steps[:, None] * self.global_batch_size + in_step).ravel()
            items = self.indices_at(epoch, positions).tolist()
            for start in range(0, len(items), batch_size):
                yield items[start : start + batch_size]

    def indices_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The sample indices at the given global positions of ``epoch`` (any order; past
        the dataset they wrap, as in :meth:`indices`)."""
        positions = positions % self.num_samples
        if not self.shuffle:
            return positions
        if self.shuffle_window is None:
            return self._full_permutation(epoch)[positions]
        blocks, window_starts = self._epoch_blocks(epoch)
        windows = window_starts.searchsorted(positions, side="right") - 1
        first, last = int(windows.min()), int(windows.max())
        if first == last:  # the usual case: one window
            return self._window_items(epoch, first, blocks)[positions - window_starts[first]]
        out = np.empty_like(positions)
        for window in np.unique(windows):  # ascending: each window built once
            at = windows == window
            items = self._window_items(epoch, int(window), blocks)
            out[at] = items[positions[at] - window_starts[window]]
        return out

    def _unwrapped(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Indices at positions ``0 <= start < stop <= num_samples``."""
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        if self.shuffle_window is None:
            return self._full_permutation(epoch)[start:stop]
        blocks, window_starts = self._epoch_blocks(epoch)
        parts = []
        window = int(window_starts.searchsorted(start, side="right")) - 1
        while start < stop:
            items = self._window_items(epoch, window, blocks)
            offset = start - int(window_starts[window])
            take = min(stop - start, len(items) - offset)
            parts.append(items[offset : offset + take])
            start += take
            window += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _full_permutation(self, epoch: int) -> np.ndarray:
        key = ("full", epoch)
        if key not in self._built:
            self._built.clear()
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            order.flags.writeable = False  # callers get views of it
            self._built[key] = order
        return self._built[key]

    def _block_starts(self) -> np.ndarray:
        """Each block's first index, and the end: ``num_blocks + 1`` int64."""
        if "starts" not in self._built:
            if isinstance(self.block_sizes, int):
                starts = np.arange(0, self.num_samples, self.block_sizes, dtype=np.int64)
                starts = np.append(starts, self.num_samples)
            else:
                sizes = np.asarray(self.block_sizes, dtype=np.int64)
                starts = np.concatenate([[0], np.cumsum(sizes[sizes > 0])])
            self._built["starts"] = starts
        return self._built["starts"]

    def _epoch_blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the epoch's block order, each window's first position and the end)."""
        key = ("blocks", epoch)
        if key not in self._built:
            starts = self._block_starts()
            for stale in [k for k in self._built if k not in ("starts", "numbers")]:
                del self._built[stale]  # one epoch at a time
            rng = np.random.default_rng([self.seed, epoch, _RNG_BLOCKS])
            blocks = rng.permutation(len(starts) - 1)
            sizes = np.diff(starts)[blocks]
            window_sizes = np.add.reduceat(sizes, np.arange(0, len(sizes), self.shuffle_window))
            window_starts = np.concatenate([[0], np.cumsum(window_sizes)])
            self._built[key] = (blocks, window_starts)
        return self._built[key]

    def _window_items(self, epoch: int, window: int, blocks: np.ndarray) -> np.ndarray:
        """The items of one window, shuffled: the last two windows built are kept (a
        micro-batch may straddle two)."""
        key = ("window", epoch, window)
        if key not in self._built:
            windows = [k for k in self._built if k[0] == "window"]
            for stale in windows[:-1]:
                del self._built[stale]
            starts = self._block_starts()
            chosen = blocks[window * self.shuffle_window : (window + 1) * self.shuffle_window]
            items = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in chosen])
            rng = np.random.default_rng([self.seed, epoch, _RNG_WINDOW, window])
            items = rng.permutation(items)
            items.flags.writeable = False  # callers get views of it
            self._built[key] = items
        return self._built[key]

    def blocks_in_use(self, epoch: int, step: int, behind: int = 1) -> np.ndarray | None:
        """The blocks (numbered as the dataset's chunks, or blocks of consecutive indices)
        that every rank's reads are in while the sampler yields optimizer step ``step`` of
        ``epoch``: the windows holding the positions of that step and the ``behind`` steps
        before it in the epoch (readers lag the sampler: loader workers' prefetched batches,
        the other ranks), and at least the window before the newest one. None: every block
        (one permutation of all samples has no windows). A cache of remote chunks keeps
        these and may drop the rest (``chunk_cache.py``)."""
        if self.shuffle and self.shuffle_window is None:
            return None
        blocks, window_starts = self._window_layout(epoch)
        start = max(0, step - behind) * self.global_batch_size
        stop = (step + 1) * self.global_batch_size
        windows: set[int] = set()
        while start < stop:  # the last global batch may wrap to the epoch's start
            first = start % self.num_samples
            last = min(first + stop - start, self.num_samples) - 1
            low, high = np.searchsorted(window_starts, [first, last], side="right") - 1
            windows.update(range(max(0, min(int(low), int(high) - 1)), int(high) + 1))
            start += last - first + 1
        width = self._window_blocks()
        chosen = np.concatenate([blocks[w * width : (w + 1) * width] for w in sorted(windows)])
        return self._block_numbers()[chosen]

    def most_blocks_in_use(self, behind: int = 1) -> int:
        """How many blocks :meth:`blocks_in_use` holds at most over an epoch's steps but
        its wrapped last one: two windows, or the windows that ``behind + 1`` global
        batches span where they hold more items than a window. The wrapped last global
        batch also reads the epoch's first window, for one step."""
        sizes = np.sort(np.diff(self._block_starts()))
        width = self._window_blocks()
        if self.shuffle and self.shuffle_window is None:
            return len(sizes)
        smallest = max(1, int(sizes[:width].sum()))  # the fewest items a full window holds
        spanned = 1 + math.ceil(((behind + 1) * self.global_batch_size - 1) / smallest)
        return min(len(sizes), width * max(2, spanned))

    def _window_blocks(self) -> int:
        """Blocks per window: ``shuffle_window``; all of them without shuffle or window."""
        if self.shuffle_window is None:
            return len(self._block_starts()) - 1
        return self.shuffle_window

    def _window_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the epoch's block order, each window's first position and the end); without
        shuffle the blocks in index order, cut into windows the same way."""
        if self.shuffle:
            return self._epoch_blocks(epoch)
        starts = self._block_starts()
        firsts = starts[np.arange(0, len(starts) - 1, self._window_blocks())]
        return np.arange(len(starts) - 1), np.append(firsts, starts[-1])

    def _block_numbers(self) -> np.ndarray:
        """The dataset's number of each block: chunks without items are never blocks."""
        if "numbers" not in self._built:
            if isinstance(self.block_sizes, int):
                numbers = np.arange(len(self._block_starts()) - 1)
            else:
                numbers = np.flatnonzero(np.asarray(self.block_sizes) > 0)
            self._built["numbers"] = numbers
        return self._built["numbers"]

    def settings(self) -> tuple[tuple[str, object], ...]:
        """What fixes this order, as a plan's ``data_order`` keeps it for a resume."""
        return (
            ("shuffle", self.shuffle),
            ("drop_last", self.drop_last),
            ("seed", self.seed),
            ("global_order", True),
            ("shuffle_window", self.shuffle_window),
            (
                "shuffle_block",
                "chunks" if not isinstance(self.block_sizes, int) else self.block_sizes,
            ),
        )


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

    ``keep_blocks(blocks, most)``, where given, hears which blocks the ranks read from now
    on (:meth:`GlobalOrder.blocks_in_use`, and the most it will be, for a cache's budget
    check) each time that changes: before the first micro-batch, then about once per
    window. It runs where the sampler runs, in each rank's main process, up to
    ``reads_behind`` steps ahead of the slowest read on the node.
    """

    def __init__(
        self,
        order: GlobalOrder,
        world_size: int,
        rank: int,
        batch_size: int,
        epoch: int = 0,
        start_step: int = 0,
        keep_blocks: Callable[[np.ndarray | None, int], None] | None = None,
        reads_behind: int = 1,
    ) -> None:
        self.order = order
        self.keep_blocks = keep_blocks
        self.reads_behind = reads_behind  # steps the slowest reader may lag this sampler
        self.most_in_use = order.most_blocks_in_use(reads_behind) if keep_blocks else 0
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
        in_use: np.ndarray | None = None
        for number, batch in enumerate(batches):
            if self.keep_blocks is not None and number % self.accumulate == 0:
                step = self.start_step + number // self.accumulate
                blocks = self.order.blocks_in_use(self.epoch, step, self.reads_behind)
                if number == 0 or not np.array_equal(blocks, in_use):
                    self.keep_blocks(blocks, self.most_in_use)
                    in_use = blocks
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
    return train_layout(
        batch_size,
        shares,
        rank_batches=(batches,) * world_size,
        tokens_per_sample=tokens_per_sample,
        order=order.settings(),
    )
