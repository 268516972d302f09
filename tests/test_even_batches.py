"""Every rank yields the same number of train batches, on real litdata loaders.

Each rank's data module is built in this process with the environment a launcher sets
(WORLD_SIZE, GLOBAL_RANK, and NNODES, which litdata derives itself on multi-node GPU
jobs); litdata reads nothing else to decide its rank, so no process group is needed to
see exactly which samples a rank would get.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_shards
from litdata import StreamingDataLoader
from shard_data import ShardData

from train_template.even_batches import EvenBatchesLoader

NUM_TRAIN = 203  # 12 + 14 batches of 8 over two ranks without drop_last


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("even-shards"), NUM_TRAIN)


def rank_module(monkeypatch, shards: Path, rank: int, world_size: int = 2, **data):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("GLOBAL_RANK", str(rank))
    module = ShardData(
        data_dir=str(shards), batch_size=8, **{"drop_last": False, "global_order": False, **data}
    )
    module.setup("fit")
    return module


def rank_loader(monkeypatch, shards: Path, rank: int, world_size: int = 2, **data):
    return rank_module(monkeypatch, shards, rank, world_size, **data).train_dataloader()


def epoch_ids(loader, epochs: int) -> list[list[list[int]]]:
    return [[batch["index"].tolist() for batch in loader] for _ in range(epochs)]


def test_short_rank_is_padded_and_every_sample_is_seen(monkeypatch, shards):
    loaders = [rank_loader(monkeypatch, shards, rank) for rank in range(2)]
    assert all(isinstance(loader, EvenBatchesLoader) for loader in loaders)
    assert [loader.own_batches for loader in loaders] == [12, 14]
    assert [len(loader) for loader in loaders] == [14, 14]
    # every rank knows every rank's own samples and batches (the plan counts these)
    layout = rank_module(monkeypatch, shards, 0).train_layout(2)
    assert (layout.rank_batches, layout.rank_samples) == ((12, 14), (96, 107))
    runs = [epoch_ids(loader, 2) for loader in loaders]
    for epoch in range(2):
        short, full = runs[0][epoch], runs[1][epoch]
        assert len(short) == len(full) == 14
        own = [i for batch in short[:12] for i in batch] + [i for batch in full for i in batch]
        assert sorted(own) == list(range(NUM_TRAIN))  # each sample once, none dropped
        assert [len(batch) for batch in short[12:]] == [8, 8]  # padding: full batches
        assert set(i for batch in short[12:] for i in batch) <= set(range(NUM_TRAIN))
    assert runs[0][0][12:] != runs[0][1][12:]  # padding draws change with the epoch


def test_even_ranks_keep_the_plain_streaming_loader(monkeypatch, shards):
    loader = rank_loader(monkeypatch, shards, 0, drop_last=True)
    assert type(loader) is StreamingDataLoader and len(loader) == 12


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("cut", [5, 12, 13])  # rank 0: in its own stream, at its end, padding
@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_resumes_exactly_from_rank_zeros_state(
    monkeypatch, shards, rank, cut, num_workers
):
    """Lightning's checkpoint holds rank 0's loader state only; each rank resumes from it."""
    workers = {"num_workers": num_workers}
    expected = epoch_ids(rank_loader(monkeypatch, shards, rank, **workers), 3)
    saver = rank_loader(monkeypatch, shards, 0, **workers)
    epoch_ids(saver, 1)
    for taken, _ in enumerate(saver, start=1):
        if taken == cut:
            state = saver.state_dict()  # what Lightning saves during this batch's step
            break
    resumed = rank_loader(monkeypatch, shards, rank, **workers)
    resumed.load_state_dict(state)
    assert epoch_ids(resumed, 2) == [expected[1][cut:], expected[2]]


def test_multi_node_ranks_get_disjoint_samples_in_every_epoch(monkeypatch, shards):
    """With NNODES=2 litdata would, from epoch 2 on, reshuffle within each node's chunks:
    both nodes read the one chunk again and train on the same samples."""
    monkeypatch.setenv("NNODES", "2")
    loaders = [rank_loader(monkeypatch, shards, rank, drop_last=True) for rank in range(2)]
    runs = [epoch_ids(loader, 3) for loader in loaders]
    for epoch in range(3):
        ids = [i for run in runs for batch in run[epoch] for i in batch]
        assert len(ids) == len(set(ids)) == 2 * 12 * 8
