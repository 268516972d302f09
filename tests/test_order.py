"""The global sample order (``--data.global_order``): every optimizer step trains on the same
set of samples on every layout, and a resume at any step from any layout to any other
continues it exactly, in every shape of its blockwise shuffle (chunks of any sizes or
blocks of consecutive indices, windows of any number of blocks, or one permutation of all
indices). Pure arithmetic over many layouts, in microseconds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train_template.order import GlobalOrder, accumulation_of

# The shapes of the shuffle: (shuffle_window, block_sizes); chunk sizes are drawn per test.
SHAPES = [(None, 1024), (64, 1024), (1, 7), (2, 7), (3, 50), (2, "chunks"), (5, "chunks")]

GLOBAL_BATCH = 48
# (world size, batch per device) pairs that share one global batch of 48
LAYOUTS = [
    (w, b)
    for w in (1, 2, 3, 4, 6, 8, 12, 16)
    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 48)
    if GLOBAL_BATCH % (w * b) == 0
]


def steps_of(order, epoch, world_size, batch_size, start_step=0):
    """{step: sorted samples} as a layout trains them (all ranks, all micro-batches)."""
    accumulate = accumulation_of(order.global_batch_size, world_size, batch_size)
    steps = {}
    for rank in range(world_size):
        batches = order.rank_batches(epoch, world_size, rank, batch_size, start_step)
        for position, batch in enumerate(batches):
            step = start_step + position // accumulate
            steps.setdefault(step, []).extend(batch)
    return {step: sorted(ids) for step, ids in steps.items()}


def order_of(num_samples, shape, seed=0, drop_last=False, chunks_seed=0):
    """A GlobalOrder of ``shape``; "chunks": irregular chunk sizes (some empty) summing
    to ``num_samples``."""
    window, blocks = shape
    if blocks == "chunks":
        rng = np.random.default_rng(chunks_seed)
        cuts = np.sort(rng.integers(0, num_samples + 1, size=max(1, num_samples // 20)))
        blocks = np.diff(np.concatenate([[0], cuts, [num_samples]])).tolist()
    return GlobalOrder(
        num_samples, GLOBAL_BATCH, seed=seed, drop_last=drop_last,
        shuffle_window=window, block_sizes=blocks,
    )  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_layout_trains_every_step_on_the_same_samples(drop_last, shape):
    order = order_of(1000, shape, seed=3, drop_last=drop_last)
    reference = steps_of(order, 0, 1, GLOBAL_BATCH)
    assert len(reference) == order.steps_per_epoch == (20 if drop_last else 21)
    for world_size, batch_size in LAYOUTS:
        assert steps_of(order, 0, world_size, batch_size) == reference, (world_size, batch_size)
    seen = [i for ids in reference.values() for i in ids]
    if drop_last:  # 20 whole global batches, no sample twice
        assert len(seen) == len(set(seen)) == 960
    else:  # every sample, the last window completed from the epoch's start
        assert set(seen) == set(range(1000)) and len(seen) == 21 * GLOBAL_BATCH


@pytest.mark.parametrize("shape", [*SHAPES, "unshuffled"], ids=str)
def test_a_ranks_micro_batches_are_its_share_of_each_steps_positions(shape):
    """``rank_batches`` gathers a rank's positions many steps at a time (``indices_at``);
    each micro-batch must be exactly, in order, its slice of the step's contiguous
    positions as :meth:`GlobalOrder.indices` reads them, also where a micro-batch
    straddles windows and where the epoch's last global batch wraps."""
    if shape == "unshuffled":
        order = GlobalOrder(1000, GLOBAL_BATCH, seed=3, shuffle=False)
    else:
        order = order_of(1000, shape, seed=3)
    for world_size, batch_size in ((1, 48), (4, 6), (3, 4), (16, 1)):
        accumulate = accumulation_of(GLOBAL_BATCH, world_size, batch_size)
        for rank in {0, world_size - 1}:
            got = list(order.rank_batches(1, world_size, rank, batch_size, start_step=2))
            assert len(got) == (order.steps_per_epoch - 2) * accumulate
            for number, batch in enumerate(got):
                step, micro = 2 + number // accumulate, number % accumulate
                first = micro * world_size * batch_size + rank * batch_size
                expected = order.step_samples(1, step)[first : first + batch_size]
                assert batch == expected.tolist(), (world_size, batch_size, rank, number)


@settings(max_examples=60, deadline=None)
@given(
    num_samples=st.integers(48, 700),
    before=st.sampled_from(LAYOUTS),
    after=st.sampled_from(LAYOUTS),
    stop=st.floats(0, 1),
    drop_last=st.booleans(),
    shape=st.sampled_from(SHAPES),
    epoch=st.integers(0, 3),
)
def test_a_resume_at_any_step_on_any_layout_continues_the_epoch(
    num_samples, before, after, stop, drop_last, shape, epoch
):
    order = order_of(num_samples, shape, seed=1, drop_last=drop_last, chunks_seed=num_samples)
    steps = order.steps_per_epoch
    resume_at = int(stop * steps)
    reference = steps_of(order, epoch, 1, GLOBAL_BATCH)
    prefix = {s: ids for s, ids in steps_of(order, epoch, *before).items() if s < resume_at}
    # A fresh order object: a resumed process builds nothing before its first step.
    resumed = order_of(num_samples, shape, seed=1, drop_last=drop_last, chunks_seed=num_samples)
    suffix = steps_of(resumed, epoch, *after, start_step=resume_at)
    assert set(prefix).isdisjoint(suffix) and {**prefix, **suffix} == reference
    seen = [i for ids in reference.values() for i in ids]
    distinct = min(num_samples, order.steps_per_epoch * GLOBAL_BATCH)
    assert len(set(seen)) == distinct  # no sample skipped ...
    assert len(seen) - distinct == (0 if drop_last else len(seen) - num_samples)  # ... or repeated


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_chained_resumes_and_the_next_epoch(shape):
    order = order_of(500, shape, seed=7)
    epoch0 = steps_of(order, 0, 1, GLOBAL_BATCH)
    chained = {
        **{s: v for s, v in steps_of(order, 0, 4, 4).items() if s < 3},  # 4 ranks
        **{s: v for s, v in steps_of(order, 0, 2, 8, start_step=3).items() if s < 7},  # 2
        **steps_of(order, 0, 4, 12, start_step=7),  # 4 again
    }
    assert chained == epoch0
    epoch1 = steps_of(order, 1, 2, 6)
    assert epoch1 == steps_of(order, 1, 16, 3) and epoch1 != epoch0  # reshuffled, same on all


def test_a_global_batch_the_layout_cannot_share_is_refused():
    with pytest.raises(ValueError):
        accumulation_of(48, 5, 4)
    assert [accumulation_of(48, w, b) for w, b in itertools.islice(LAYOUTS, 3)] == [48, 24, 16]


@pytest.mark.parametrize("workers", [0, 1, 2, 3, 4])
def test_loader_workers_hand_out_the_ranks_batches_in_order(workers):
    """The sampler in a real DataLoader (fork workers): any worker count yields each
    rank's micro-batches of the order, resumed at a step, in order."""
    from torch.utils.data import BatchSampler, DataLoader

    from train_template.order import GlobalOrderSampler

    order = order_of(203, (2, 7), seed=5)  # 29 blocks, 15 windows
    for world_size, batch_size, rank, start in ((1, 48, 0, 0), (4, 6, 3, 2), (3, 8, 1, 4)):
        sampler = GlobalOrderSampler(order, world_size, rank, batch_size, start_step=start)
        loader = DataLoader(
            list(range(203)),
            batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
            num_workers=workers,
        )
        got = [batch.tolist() for batch in loader]
        assert got == list(order.rank_batches(0, world_size, rank, batch_size, start))
        assert len(loader) == order.steps_per_epoch * GLOBAL_BATCH // (world_size * batch_size)


def test_an_epoch_smaller_than_a_global_batch_fills_its_window_by_repeating():
    """1-3 samples, global batch 8 (found by hypothesis in test_plan_lightning): the one
    step's window holds 8 positions, the epoch's samples repeated in order."""
    for num_samples in (1, 3):
        order = GlobalOrder(num_samples, 8, seed=0)
        assert order.steps_per_epoch == 1
        window = order.step_samples(0, 0).tolist()
        assert len(window) == 8 and set(window) == set(range(num_samples))
        assert window[num_samples:] == (window[:num_samples] * 8)[: 8 - num_samples]


def test_a_window_of_none_is_the_order_of_checkpoints_before_windows():
    """``--plan.shuffle_window null`` is bitwise the previous order (one permutation of
    every index, seeded by [seed, epoch]): a checkpoint written before windows resumes in
    its own order (the resume check refuses it otherwise: tests/test_resume.py)."""
    for epoch in range(3):
        order = GlobalOrder(1000, GLOBAL_BATCH, seed=11, shuffle_window=None)
        before = np.random.default_rng([11, epoch]).permutation(1000)
        assert order.epoch_order(epoch)[:1000].tolist() == before.tolist()


@pytest.mark.parametrize("window", [1, 2, 4])
def test_each_global_batch_reads_the_blocks_of_at_most_two_windows(window):
    """Chunk locality: the ranks read a window of blocks at a time; a global batch reads
    at most the blocks of the two windows it straddles, and over an epoch every block's
    items are read in one run of consecutive steps (about one download per chunk). Chunks
    of 60-140 items, each more than a global batch of 48, as real chunks are."""
    sizes = np.random.default_rng(5).integers(60, 141, size=20)
    sizes[-1] += 2000 - sizes.sum()
    order = GlobalOrder(2000, GLOBAL_BATCH, seed=2, shuffle_window=window, block_sizes=sizes)
    starts = order._block_starts()
    block_of = np.searchsorted(starts, np.arange(2000), side="right") - 1
    steps_reading = {}
    for step in range(order.steps_per_epoch):
        blocks = set(block_of[order.step_samples(0, step)].tolist())
        assert len(blocks) <= 2 * window
        for block in blocks:
            steps_reading.setdefault(block, []).append(step)
    padded_last = order.steps_per_epoch - 1  # it also reads the epoch's first samples again
    for block, steps in steps_reading.items():
        steps = [s for s in steps if s != padded_last] or steps
        assert steps == list(range(steps[0], steps[-1] + 1)), block


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("window", "behind"), [(1, 1), (2, 1), (2, 5), (4, 3)])
def test_the_blocks_in_use_cover_every_read_and_stay_within_their_bound(shuffle, window, behind):
    """What a node's cache of remote chunks keeps (chunk_cache.py): at every step the
    blocks in use hold the blocks of that step's samples and of the ``behind`` steps
    before it in the epoch (readers lag the sampler), and no more blocks than
    ``most_blocks_in_use`` (but the wrapped last step, which also reads the first window);
    without windows (one permutation) every block. Irregular chunks, some empty."""
    sizes = np.random.default_rng(7).integers(0, 141, size=24)
    sizes[-1] += 2000 - sizes.sum()
    order = GlobalOrder(
        2000, GLOBAL_BATCH, seed=4, shuffle=shuffle, shuffle_window=window, block_sizes=sizes
    )
    chunk_of = np.searchsorted(np.cumsum(sizes), np.arange(2000), side="right")
    last = order.steps_per_epoch - 1
    for epoch in range(2):
        for step in range(order.steps_per_epoch):
            kept = set(order.blocks_in_use(epoch, step, behind).tolist())
            for earlier in range(max(0, step - behind), step + 1):
                assert set(chunk_of[order.step_samples(epoch, earlier)].tolist()) <= kept
            assert all(sizes[b] > 0 for b in kept)
            if step != last:
                assert len(kept) <= order.most_blocks_in_use(behind), (step, kept)
    whole = GlobalOrder(2000, GLOBAL_BATCH, shuffle_window=None, block_sizes=sizes)
    assert whole.blocks_in_use(0, 3) is None
    assert whole.most_blocks_in_use() == int((sizes > 0).sum())


def test_a_billion_samples_cost_a_rank_megabytes_and_any_step_is_reachable():
    """The order of 1e9 samples, read at step 900,000 of 976,563 as a resumed rank of 8
    would: what it builds is one int64 per block and two windows of items (no array of
    num_samples), and the rank's micro-batch is its share of the step's global batch."""
    order = GlobalOrder(10**9, 1024, seed=3)  # default window and block
    batches = order.rank_batches(0, 8, 5, 128, start_step=900_000)
    first = next(batches)
    assert len(first) == 128 and len(set(first)) == 128
    arrays = [a for v in order._built.values() for a in (v if isinstance(v, tuple) else [v])]
    held = sum(a.nbytes for a in arrays)
    assert held < 24 * 2**20, held  # 1e9 / 1024 blocks: 7.6 MB of block order, 0.5 MB a window
    step = order.step_samples(0, 900_000)
    assert first == step[5 * 128 : 6 * 128].tolist()
