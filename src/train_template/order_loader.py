"""The global sample order in a fit (``order.py``): every map-style train loader trains in it.

Lightning splits a map-style train loader over ranks with its ``DistributedSampler``,
whose split depends on the world size and which restarts its epoch after a mid-epoch
resume (Lightning has no position to give it back). ``PlannedTrainer`` puts a
:class:`~train_template.order.GlobalOrderSampler` where Lightning would put that
sampler (``seam.loop.replace_train_sampler``), on one process too, so that any such loader,
the template's ``StreamingDataModule`` or a user's plain ``DataLoader(dataset,
batch_size, shuffle=True)``, trains every optimizer step on the same samples on every
layout, and resumes mid-epoch exactly, from the trainer's restored global step.

Which loaders: a ``DataLoader`` over a map-style dataset whose batches come from torch's
own ``BatchSampler`` over a ``RandomSampler`` (``shuffle=True``) or a
``SequentialSampler`` (``shuffle=False``), i.e. what ``DataLoader(dataset, batch_size,
shuffle, drop_last)`` builds. A loader with a sampler of its own (weighted, bucketed)
decides its own order: it keeps Lightning's ``DistributedSampler`` and the same-layout
resume rules (``resume.RESUME_KEYS``), and so does a run with ``use_distributed_sampler``
off. The order's seed is the loader's generator seed (``DataLoader(generator=...)``),
else the run's ``seed_everything`` seed, as Lightning's ``DistributedSampler`` takes it.
The shuffle is blockwise (``order.py``): a dataset whose items are stored in chunks says
so with a ``chunk_sizes()`` method (items per chunk, in index order; ``ItemsOf`` of the
template's litdata shards has one) and its chunks are the blocks; any other dataset is cut
into blocks of ``--plan.shuffle_block`` consecutive indices. Such a dataset may also have
``keep_chunks(chunks, most)``: each rank's sampler calls it whenever the chunks its reads
are in change (``GlobalOrderSampler``), so that a local cache of remote chunks keeps only
those (``chunk_cache.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from train_template.layout import TrainLayout
from train_template.options import SHUFFLE_BLOCK, SHUFFLE_WINDOW
from train_template.order import GlobalOrder, GlobalOrderSampler, global_order_layout
from train_template.resume import in_global_order, order_position
from train_template.seam.loop import epochs_started, loader_with_sampler


@dataclass(frozen=True)
class LoaderOrder:
    """What a plain map-style train loader says about its order."""

    num_samples: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int
    chunk_sizes: tuple[int, ...] | None = None  # the dataset's chunks, if it says them

    def global_order(
        self, world_size: int, accumulate_grad_batches: int, data_order: dict | None = None
    ) -> GlobalOrder:
        """The order at this layout; its window and block as the plan's ``data_order``
        says (the run's ``--plan.shuffle_*``, or a resumed checkpoint's), else the defaults."""
        data_order = data_order or {}
        window = data_order.get("shuffle_window", SHUFFLE_WINDOW)
        block = data_order.get("shuffle_block", SHUFFLE_BLOCK)
        return GlobalOrder(
            self.num_samples,
            world_size * self.batch_size * accumulate_grad_batches,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            shuffle_window=window,
            block_sizes=self.chunk_sizes if self.chunk_sizes is not None else block,
        )


def loader_order(loader: Any) -> LoaderOrder | None:
    """The order settings of a loader the global order can take over; None for any other
    (an iterable dataset, a custom sampler or batch sampler)."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return None
    batch_sampler, sampler = loader.batch_sampler, loader.sampler
    if type(batch_sampler) is not BatchSampler:
        return None
    if type(sampler) is RandomSampler:
        if sampler.replacement or sampler.num_samples != len(loader.dataset):
            return None  # draws with replacement or a set count: its own order
        shuffle = True
        generator = sampler.generator
    elif type(sampler) is SequentialSampler:
        shuffle, generator = False, None
    else:
        return None
    seed = (
        generator.initial_seed()
        if generator is not None
        else int(os.environ.get("PL_GLOBAL_SEED", 0))  # Lightning's DistributedSampler seed
    )
    chunks = getattr(loader.dataset, "chunk_sizes", None)
    return LoaderOrder(
        len(loader.dataset),
        loader.batch_size,
        shuffle,
        loader.drop_last,
        seed,
        chunk_sizes=tuple(chunks()) if callable(chunks) else None,
    )


def loader_layout(
    loader: Any, world_size: int, accumulate_grad_batches: int, tokens_per_sample: int | None
) -> TrainLayout | None:
    """The layout ``loader`` trains in under the global order (None: not taken over)."""
    settings = loader_order(loader)
    if settings is None:
        return None
    order = settings.global_order(world_size, accumulate_grad_batches)
    return global_order_layout(order, world_size, settings.batch_size, tokens_per_sample)


def chunk_keeper(loader: Any, settings: LoaderOrder) -> Any:
    """The dataset's ``keep_chunks(chunks, most)``, if it has one (not None) and states its
    chunks: the sampler tells it which chunks the ranks read from now on (a cache of remote
    chunks drops the others; ``chunk_cache.py``)."""
    keep = getattr(loader.dataset, "keep_chunks", None)
    return keep if callable(keep) and settings.chunk_sizes is not None else None


def reads_behind(loader: DataLoader, accumulate_grad_batches: int) -> int:
    """Optimizer steps the reads of a node may lag a rank's sampler: the micro-batches its
    loader workers hold prefetched (``prefetch_factor`` each), and one step for the other
    ranks (every rank waits for the others at each optimizer step)."""
    prefetched = loader.num_workers * (loader.prefetch_factor or 0)
    return math.ceil(prefetched / accumulate_grad_batches) + 1


def ordered_train_loader(loader: Any, trainer: Any) -> DataLoader | None:
    """``loader`` with this rank's :class:`GlobalOrderSampler` in place of its sampler,
    positioned at the trainer's restored step; None when the loader keeps its own order.

    Called when Lightning prepares the train loader (after the checkpoint is restored,
    with the plan's accumulation on the trainer), on every rank."""
    settings = loader_order(loader)
    plan = getattr(trainer, "training_plan", None)
    if settings is None or plan is None or not in_global_order(plan):
        return None
    order = settings.global_order(
        trainer.world_size, trainer.accumulate_grad_batches, plan.data_order
    )
    epoch, start_step = order_position(
        trainer.global_step, epochs_started(trainer), plan.steps_per_epoch
    )
    sampler = GlobalOrderSampler(
        order,
        trainer.world_size,
        trainer.global_rank,
        settings.batch_size,
        epoch=epoch,
        start_step=start_step,
        keep_blocks=chunk_keeper(loader, settings),
        reads_behind=reads_behind(loader, trainer.accumulate_grad_batches),
    )
    return loader_with_sampler(loader, sampler)
