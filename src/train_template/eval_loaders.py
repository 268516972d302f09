"""``StreamingDataModule``'s evaluation and prediction loaders: every rank runs the same
number of batches where a forward pass is a collective.

litdata gives the last rank the leftover samples, so ranks may evaluate different numbers
of batches. Under DDP that is harmless (no collective in a forward pass); under a sharded
strategy (FSDP all-gathers the parameters in every forward) the longer rank would wait
forever. There the shorter ranks' validation and test loaders are padded as torch's
``DistributedSampler`` pads (a few samples seen twice, at most one batch a rank); a
prediction is not padded (a padded sample would be written twice) and uneven ranks are
refused in one line.
"""

from __future__ import annotations

from typing import Any

import torch
from litdata import StreamingDataLoader

from train_template.errors import UserError
from train_template.even_batches import EvenBatchesLoader
from train_template.sharding import forward_is_collective


def evaluation_loader(data: Any, split: str) -> StreamingDataLoader | EvenBatchesLoader:
    """``data``'s loader of ``split`` ("val", "test"), padded to the longest rank's length
    where that matters."""
    loader = data.stream_loader(split)
    counts = batches_of_every_rank(data.trainer, loader)
    if len(set(counts)) <= 1:
        return loader
    return EvenBatchesLoader(
        loader, max(counts), data.make_dataset(split), split_size=data.split_size(split)
    )


def prediction_loader(data: Any) -> StreamingDataLoader:
    loader = data.stream_loader(data.predict_split)
    counts = batches_of_every_rank(data.trainer, loader)
    if len(set(counts)) > 1:
        raise UserError(
            f"predict under a sharded strategy: the '{data.predict_split}' split gives the "
            f"ranks {counts} batches, and every rank must run the same number: use "
            "--trainer.devices 1 (the sharded checkpoint loads on any number of devices)"
        )
    return loader


def batches_of_every_rank(trainer: Any, loader: StreamingDataLoader) -> list[int]:
    """Every rank's batch count of a loader, where it matters: under a strategy whose
    forward pass is a collective (one all-gather, on every rank); else this rank's only."""
    if trainer is None or trainer.world_size == 1:
        return [len(loader)]
    if not forward_is_collective(trainer.strategy):
        return [len(loader)]
    own = torch.tensor([len(loader)], device=trainer.strategy.root_device)
    return trainer.strategy.all_gather(own).reshape(-1).tolist()
