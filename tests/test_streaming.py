"""What a ``StreamingDataModule`` hands a user's collate, on real litdata shards.

litdata returns a ``bytes`` field as a ``memoryview`` into a memory-mapped chunk (local
shards, and every chunk read by index); a view cannot cross from a loader worker to the
main process, and torch then only prints the pickling error in the worker while the
main process waits for the batch for ever. The template hands back ``bytes``.
"""

from __future__ import annotations

import pytest
from conftest import write_shards

from train_template.stream_items import owned_bytes
from train_template.streaming import StreamingDataModule


class SamplesAsTheyCome(StreamingDataModule):
    """A user's module whose collate keeps the samples as litdata returns them."""

    def collate(self, samples):
        return samples


@pytest.mark.parametrize("global_order", [True, False], ids=["global-order", "litdata-stream"])
def test_bytes_fields_come_back_as_bytes_and_cross_loader_workers(tmp_path, global_order):
    data = write_shards(tmp_path / "data", 40, num_val=24)
    module = SamplesAsTheyCome(str(data), batch_size=8, num_workers=2, global_order=global_order)
    module.setup("fit")
    loaders = {"train": module.train_dataloader(), "val": module.val_dataloader()}
    for name, loader in loaders.items():
        # Without the fix a worker's batch never arrives: fail after a minute, not never.
        loader.timeout = 60
        samples = [sample for batch in loader for sample in batch]
        assert {type(sample["image"]) for sample in samples} == {bytes}, name
        assert all(len(sample["image"]) == 64 for sample in samples), name
        assert len({sample["index"] for sample in samples}) == {"train": 40, "val": 24}[name]


def test_owned_bytes_keeps_the_structure_of_a_sample():
    view = memoryview(b"abc")
    sample = {"a": view, "b": [view, 1], "c": (view, "x"), "d": 2.5}
    assert owned_bytes(sample) == {"a": b"abc", "b": [b"abc", 1], "c": (b"abc", "x"), "d": 2.5}
    assert type(owned_bytes(sample)["b"][0]) is bytes


def test_a_micro_batch_read_from_the_chunk_maps_equals_litdatas_own_reads(tmp_path):
    """The global order slices a micro-batch's items from each chunk's memory map and
    has litdata decode them (``ItemsOf.__getitems__``, ``seam.litdata.item_decoder``):
    the same items, transformed the same way, as litdata's ``dataset[i]``, in the order
    asked for, across 20 chunks of 50 items."""
    import numpy as np

    data = write_shards(tmp_path / "data", 1000, chunk_bytes="4KB")
    module = SamplesAsTheyCome(str(data), batch_size=16)
    module.setup("fit")
    items = module.train_dataloader().dataset
    assert len(items.chunk_sizes()) == 20
    rng = np.random.default_rng(0)
    for _ in range(30):
        indices = rng.choice(1000, 16, replace=False).tolist()
        assert items.__getitems__(indices) == [items.dataset[i] for i in indices]
    assert items.decode is not None  # the maps were used, not litdata's reader
