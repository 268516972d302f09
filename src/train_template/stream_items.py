"""The train split read by index, in the global sample order (``--data.global_order true``,
the default): a plain map-style loader over the shards' items, which the template trains
in its global order (``order_loader.py``) as it trains any user's
``DataLoader(dataset, shuffle=True)``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset
from torch.utils.data import DataLoader, Dataset

from train_template.chunk_cache import WindowCache
from train_template.layout import TrainLayout
from train_template.order_loader import loader_layout
from train_template.seam.litdata import (
    chunk_sizes,
    keep_downloaded_chunks,
    read_whole_chunks,
    view_as_rank,
)


class GlobalOrderTrain:
    """``StreamingDataModule``'s train loader in the global order: every rank reads any
    item by index (litdata's own shuffle and drop_last stay off: the order decides)."""

    reads_by_index = True

    def __init__(self, data: Any) -> None:
        self.data = data  # the StreamingDataModule
        self.cache: WindowCache | None = None  # remote shards only

    def prepare(self, dataset: StreamingDataset) -> StreamingDataset:
        """The train dataset as one rank that sees every item, chunks read whole; remote
        shards with the cache of the windows in use (``chunk_cache.py``)."""
        read_whole_chunks(dataset)
        if dataset.input_dir.url:
            chunks = self.data.split_chunks("train")
            self.cache = WindowCache(dataset, dataset.input_dir.url, chunks)
        return view_as_rank(dataset, 1, 0)

    def setup(self) -> None:
        """Nothing to check here: the plan checks the global order's batches."""

    def loader(self) -> DataLoader:
        data = self.data
        if "train" not in data.datasets:
            data.datasets["train"] = data.make_dataset("train")
        return DataLoader(
            ItemsOf(data.datasets["train"], self.cache),
            batch_size=data.batch_size,
            shuffle=data.shuffle,
            drop_last=data.drop_last,
            num_workers=data.num_workers,
            collate_fn=data.collate,
            persistent_workers=data.num_workers > 0,
            pin_memory=data.pins_memory,
            generator=torch.Generator().manual_seed(data.seed),  # the order's seed
        )

    def layout(self, world_size: int, accumulate_grad_batches: int) -> TrainLayout:
        """Every rank: whole global batches of the global order."""
        tokens = getattr(self.data, "tokens_per_sample", None)
        layout = loader_layout(self.loader(), world_size, accumulate_grad_batches, tokens)
        assert layout is not None, "a plain shuffled or sequential loader"
        return layout


def owned_bytes(item: Any) -> Any:
    """A sample with its ``bytes`` fields as ``bytes``, the type they were written as.

    litdata (0.2.76) returns a ``bytes`` field as a ``memoryview`` into the chunk whenever
    it reads from a memory-mapped chunk (local shards, and every chunk read by index,
    ``seam.litdata.keep_downloaded_chunks``). A view cannot be pickled: a collate that passes it on
    makes a loader worker fail to send its batch, which torch only prints in the worker
    while the main process waits for that batch for ever; it also pins the chunk's map.
    One copy per field (3 KB: well under a microsecond) removes both. Lightning's
    ``apply_to_collection`` does the same walk generically at 10x the cost (5.7 against
    0.55 us a sample of 64-byte images), a third of the loader's time per sample.
    """
    kind = type(item)
    if kind is dict:  # litdata's usual sample: a fresh dict per read, changed in place
        for key, value in item.items():
            if type(value) in _CONTAINERS:
                item[key] = owned_bytes(value)
        return item
    if kind is memoryview:
        return item.tobytes()
    if isinstance(item, list):
        return [owned_bytes(value) for value in item]
    if isinstance(item, tuple):
        values = [owned_bytes(value) for value in item]
        return kind(*values) if hasattr(item, "_fields") else kind(values)
    return item


_CONTAINERS = frozenset({memoryview, dict, list, tuple})


class ItemsOf(Dataset):
    """A ``StreamingDataset`` read by index (``dataset[i]``): a map-style dataset, so that
    the train loader can take the global order's sampler."""

    def __init__(self, dataset: StreamingDataset, cache: WindowCache | None = None) -> None:
        self.dataset = dataset
        self.cache = cache  # remote shards: the chunks kept locally
        self.length = len(dataset)  # every item: read as one rank, no shuffle, no drop
        self.reader_set_in: int | None = None  # the process whose reader is set up
        self.chunk_starts: np.ndarray | None = None  # each chunk's end index, when needed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        self.own_reader()
        return item

    def own_reader(self) -> None:
        """Once per process, after its first read (litdata makes its reader then):
        every chunk memory-mapped, downloads kept until :meth:`keep_chunks` drops them."""
        if self.reader_set_in != os.getpid() and keep_downloaded_chunks(self.dataset):
            self.reader_set_in = os.getpid()

    def chunk_sizes(self) -> list[int]:
        """Items per chunk in index order: the global order's shuffle blocks, so that a
        rank reads a few chunks at a time (``order.py``)."""
        return chunk_sizes(self.dataset)

    def chunk_of(self, indices: list[int]) -> np.ndarray:
        """The chunk number of each index."""
        if self.chunk_starts is None:
            self.chunk_starts = np.cumsum(self.chunk_sizes())
        return np.searchsorted(self.chunk_starts, indices, side="right")

    def keep_chunks(self, chunks: Any, most: int) -> None:
        """The global order's sampler says which chunks are read from now on
        (``GlobalOrderSampler(keep_blocks=...)``): a remote split's cache drops the rest."""
        if self.cache is not None:
            self.cache.keep(chunks, most)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """A whole micro-batch (torch's loader asks for it in one call): read in index
        order, i.e. chunk by chunk and in file order within a chunk, and returned in the
        order asked for. litdata pays for every switch of chunk (a round trip through its
        download thread for remote data, a page read locally); a random batch read in
        its own order switches at almost every item."""
        ordered = sorted(set(indices))
        if self.cache is not None:
            self.cache.fetch(np.unique(self.chunk_of(ordered)))
        items = {ordered[0]: self[ordered[0]]}
        items.update((index, self.dataset[index]) for index in ordered[1:])
        return [items[index] for index in indices]
