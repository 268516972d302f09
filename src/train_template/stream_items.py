"""The train split read by index, in the global sample order (``--data.global_order true``,
the default): a plain map-style loader over the shards' items, which the template trains
in its global order (``order_loader.py``) as it trains any user's
``DataLoader(dataset, shuffle=True)``.
"""

from __future__ import annotations

import collections
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
    chunk_files,
    chunk_regions,
    item_decoder,
    keep_downloaded_chunks,
    map_chunk,
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

    MAPS_KEPT = 64  # chunk maps a process keeps (a window's chunks, by default)

    def __init__(self, dataset: StreamingDataset, cache: WindowCache | None = None) -> None:
        self.dataset = dataset
        self.cache = cache  # remote shards: the chunks kept locally
        # The global order's sampler says which chunks are read from now on
        # (``GlobalOrderSampler(keep_blocks=...)``); local shards need not hear it.
        self.keep_chunks = cache.keep if cache is not None else None
        self.length = len(dataset)  # every item: read as one rank, no shuffle, no drop
        regions = np.asarray(chunk_regions(dataset), dtype=np.int64).reshape(-1, 2)
        self.chunk_ends = np.cumsum(regions[:, 1] - regions[:, 0])  # in index order
        # A chunk's row of index i: i + row_shift[chunk] (rows before its region skipped).
        self.row_shift = regions[:, 0] - (self.chunk_ends - (regions[:, 1] - regions[:, 0]))
        self.folder, self.files = chunk_files(dataset)
        self.process: int | None = None  # the process the fields below belong to
        self.decode: Any = None  # seam.litdata.item_decoder, once this process has read
        self.maps: collections.OrderedDict = collections.OrderedDict()

    def __getstate__(self) -> dict:
        """A loader worker's copy (spawned workers get it pickled): no maps, no reader."""
        state = dict(self.__dict__)
        state.update(process=None, decode=None, maps=collections.OrderedDict())
        return state

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if self.process != os.getpid() and keep_downloaded_chunks(self.dataset):
            # Once per process, after its first read (litdata makes its reader then).
            self.process = os.getpid()
            self.decode = item_decoder(self.dataset)
            self.maps = collections.OrderedDict()
        return item

    def chunk_sizes(self) -> list[int]:
        """Items per chunk in index order: the global order's shuffle blocks, so that a
        rank reads a few chunks at a time (``order.py``)."""
        return np.diff(self.chunk_ends, prepend=0).tolist()

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """A whole micro-batch (torch's loader asks for it in one call): read in index
        order, i.e. chunk by chunk and in file order within a chunk, and returned in the
        order asked for. Remote chunks are fetched first (``chunk_cache.py``); plain items
        are then sliced from each chunk's memory map and decoded by litdata
        (``seam.litdata.item_decoder``: a third of litdata's own cost per read), anything
        else is read through ``dataset[i]``."""
        ordered = sorted(set(indices))
        chunks = np.searchsorted(self.chunk_ends, ordered, side="right")
        if self.cache is not None:
            self.cache.fetch(np.unique(chunks))
        items = {ordered[0]: self[ordered[0]]}
        if self.decode is None:
            items.update((index, self.dataset[index]) for index in ordered[1:])
        else:
            rows = (np.asarray(ordered) + self.row_shift[chunks]).tolist()
            for index, chunk, row in zip(ordered[1:], chunks[1:].tolist(), rows[1:], strict=True):
                view, offsets = self.chunk_map(chunk)
                items[index] = self.decode(view[offsets[row] : offsets[row + 1]])
        return [items[index] for index in indices]

    def chunk_map(self, chunk: int) -> tuple[memoryview, np.ndarray]:
        """A chunk's map and item offsets (``seam.litdata.map_chunk``), the most recently
        read ``MAPS_KEPT`` kept. A map outlives the removal of its file (a remote chunk
        dropped by the cache) until it leaves this list."""
        found = self.maps.get(chunk)
        if found is None:
            found = self.maps[chunk] = map_chunk(os.path.join(self.folder, self.files[chunk]))
            if len(self.maps) > self.MAPS_KEPT:
                self.maps.popitem(last=False)
        else:
            self.maps.move_to_end(chunk)
        return found
