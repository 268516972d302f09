"""The global sample order (``--data.global_order``): every optimizer step trains on the same
set of samples on every layout, and a resume at any step from any layout to any other
continues it exactly. Pure arithmetic over many layouts, in microseconds."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train_template.order import GlobalOrder, accumulation_of

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


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_layout_trains_every_step_on_the_same_samples(drop_last):
    order = GlobalOrder(1000, GLOBAL_BATCH, seed=3, drop_last=drop_last)
    reference = steps_of(order, 0, 1, GLOBAL_BATCH)
    assert len(reference) == order.steps_per_epoch == (20 if drop_last else 21)
    for world_size, batch_size in LAYOUTS:
        assert steps_of(order, 0, world_size, batch_size) == reference, (world_size, batch_size)
    seen = [i for ids in reference.values() for i in ids]
    if drop_last:  # 20 whole global batches, no sample twice
        assert len(seen) == len(set(seen)) == 960
    else:  # every sample, the last window completed from the epoch's start
        assert set(seen) == set(range(1000)) and len(seen) == 21 * GLOBAL_BATCH


@settings(max_examples=60, deadline=None)
@given(
    num_samples=st.integers(48, 700),
    before=st.sampled_from(LAYOUTS),
    after=st.sampled_from(LAYOUTS),
    stop=st.floats(0, 1),
    drop_last=st.booleans(),
)
def test_a_resume_at_any_step_on_any_layout_continues_the_epoch(
    num_samples, before, after, stop, drop_last
):
    order = GlobalOrder(num_samples, GLOBAL_BATCH, seed=1, drop_last=drop_last)
    steps = order.steps_per_epoch
    resume_at = int(stop * steps)
    reference = steps_of(order, 0, 1, GLOBAL_BATCH)
    prefix = {s: ids for s, ids in steps_of(order, 0, *before).items() if s < resume_at}
    suffix = steps_of(order, 0, *after, start_step=resume_at)
    assert set(prefix).isdisjoint(suffix) and {**prefix, **suffix} == reference


def test_chained_resumes_and_the_next_epoch():
    order = GlobalOrder(500, GLOBAL_BATCH, seed=7)
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

    order = GlobalOrder(203, GLOBAL_BATCH, seed=5)
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
