"""The plan's arithmetic: Lightning's step rule, length precedence, warmup, clear errors.

Pure functions, no Trainer: these run in microseconds, so hypothesis can cover the
whole input space. ``test_plan_lightning.py`` checks the same plan against real fits.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from train_template.errors import PlanError
from train_template.layout import accumulation_for, accumulation_window_size
from train_template.options import LRSchedule
from train_template.plan import WarmupSetting, make_plan
from train_template.resume import plan_changes
from train_template.schedule import PlannedLRLambda, lr_factor


def test_the_naive_formula_is_wrong_and_the_plan_is_not():
    # N=100, batch 8, drop_last -> 12 batches; accumulate 4 -> 3 steps per epoch.
    plan = make_plan(
        batches_per_epoch=100 // 8, batch_size=8, accumulate_grad_batches=4, max_epochs=3
    )
    naive = math.ceil(100 / (8 * 4 * 1))  # 4 steps per epoch
    assert plan.steps_per_epoch == 3 != naive
    assert plan.max_steps == 9
    # Lightning performing 3 on the real loader (N=100, batch 8, accumulation 4, drop_last):
    # tests/test_plan_lightning.py::test_the_readmes_example_runs_three_steps_per_epoch


@given(
    batches=st.integers(1, 10_000),
    accumulate=st.integers(1, 64),
    epochs=st.integers(1, 50),
    devices=st.integers(1, 8),
    nodes=st.integers(1, 4),
)
def test_steps_follow_lightnings_rule(batches, accumulate, epochs, devices, nodes):
    plan = make_plan(
        batches_per_epoch=batches,
        batch_size=4,
        accumulate_grad_batches=accumulate,
        devices=devices,
        num_nodes=nodes,
        max_epochs=epochs,
    )
    # Lightning steps every `accumulate` batches and on the epoch's last batch.
    steps = sum(1 for b in range(batches) if (b + 1) % accumulate == 0 or b == batches - 1)
    assert plan.steps_per_epoch == steps
    assert plan.max_steps == steps * epochs
    assert plan.world_size == devices * nodes
    assert plan.global_batch_size == 4 * accumulate * devices * nodes


@given(batches=st.integers(1, 500), accumulate=st.integers(1, 8), max_steps=st.integers(1, 5000))
def test_step_budget_wins_and_sets_enough_epochs(batches, accumulate, max_steps):
    plan = make_plan(
        batches_per_epoch=batches,
        batch_size=2,
        accumulate_grad_batches=accumulate,
        max_epochs=1,
        max_steps=max_steps,
    )
    assert plan.length_from == "max_steps" and plan.max_steps == max_steps
    assert (
        (plan.epochs - 1) * plan.steps_per_epoch < max_steps <= plan.epochs * plan.steps_per_epoch
    )


@given(batches=st.integers(1, 200), accumulate=st.integers(1, 8), samples=st.integers(1, 100_000))
def test_sample_budget_covers_the_samples(batches, accumulate, samples):
    plan = make_plan(
        batches_per_epoch=batches,
        batch_size=8,
        accumulate_grad_batches=accumulate,
        devices=2,
        max_samples=samples,
    )
    assert plan.length_from == "max_samples"
    full_epochs, rest = divmod(samples, plan.samples_per_epoch)
    rest_batches = math.ceil(rest / 16)
    assert plan.max_steps == full_epochs * plan.steps_per_epoch + math.ceil(
        rest_batches / accumulate
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batches_per_epoch": 0}, "yields 0 batches"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"max_steps": 10, "max_samples": 100}, "keep only one training length"),
        ({"max_epochs": None}, "--trainer.max_epochs=None trains nothing"),
        ({"max_epochs": 0}, "--trainer.max_epochs=0 trains nothing"),
        ({"max_steps": 0}, "--trainer.max_steps=0 trains nothing"),
        ({"max_tokens": 1000}, "yields no token samples"),
        (
            {"max_tokens": 1000, "max_samples": 10, "tokens_per_sample": 4},
            "keep only one training length",
        ),
        (
            {"warmup": WarmupSetting(steps=30)},
            "warmup (30 steps) is not shorter than training (30 steps)",
        ),
        ({"warmup": WarmupSetting(fraction=1.5)}, "outside [0, 1)"),
    ],
)
def test_impossible_inputs_stop_with_a_one_line_error(kwargs, message):
    """Including every length that trains nothing (Lightning would exit 0 having done nothing)."""
    args = {"batches_per_epoch": 10, "batch_size": 8, "accumulate_grad_batches": 1, "max_epochs": 3}
    with pytest.raises(PlanError) as error:
        make_plan(**{**args, **kwargs})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_warmup_units():
    base = {"batches_per_epoch": 10, "batch_size": 8, "accumulate_grad_batches": 3, "max_epochs": 5}
    assert make_plan(**base, warmup=WarmupSetting(steps=7)).warmup_steps == 7
    assert make_plan(**base, warmup=WarmupSetting(fraction=0.1)).warmup_steps == 2  # 10% of 20
    assert make_plan(**base, warmup=WarmupSetting(epochs=1.5)).warmup_steps == 6  # 1.5 x 4
    # most specific wins, so a config's default fraction can be overridden by steps
    assert make_plan(**base, warmup=WarmupSetting(steps=3, fraction=0.5)).warmup_steps == 3


@given(
    total=st.integers(1, 3000),
    warmup_share=st.floats(0, 0.99),
    decay=st.sampled_from(["cosine", "linear", "constant"]),
    final=st.floats(0, 1),
    stable=st.floats(0, 0.9),
)
def test_schedule_starts_at_warmup_start_ends_at_final_and_never_overruns(
    total, warmup_share, decay, final, stable
):
    warmup = int(warmup_share * total)
    factor = PlannedLRLambda(
        LRSchedule(
            decay=decay, final_lr_factor=final, warmup_start_factor=0.01, stable_fraction=stable
        ),
        warmup,
        total,
    )
    end = 1.0 if decay == "constant" else final
    if warmup > 0:
        assert factor(0) == pytest.approx(0.01)
    assert factor(total - 1) == pytest.approx(end)
    assert factor(total + 10) == factor(total - 1)  # stepping past the end changes nothing
    values = [factor(s) for s in range(total)]
    assert all(min(final, 0.01) - 1e-9 <= v <= 1 + 1e-9 for v in values)


def test_warmup_stable_decay_holds_the_peak():
    values = [
        lr_factor(s, total_steps=101, warmup_steps=10, decay="linear", stable_fraction=0.5)
        for s in range(101)
    ]
    assert values[10:55] == [1.0] * 45
    assert values[-1] == 0.0


@given(batches=st.integers(1, 300), accumulate=st.integers(1, 9))
def test_accumulation_windows_partition_the_epoch(batches, accumulate):
    sizes = [accumulation_window_size(b, batches, accumulate) for b in range(batches)]
    assert all(size == accumulate for size in sizes[: (batches // accumulate) * accumulate])
    assert sizes[-1] == (batches % accumulate or accumulate)


def test_plan_changes_names_what_changed_world_size_and_data_settings_first():
    order = {"seed": 42, "shuffle": True}
    saved = make_plan(
        batches_per_epoch=10,
        batch_size=8,
        accumulate_grad_batches=1,
        max_epochs=2,
        data_order=order,
    ).to_dict()
    now = make_plan(
        batches_per_epoch=5,
        batch_size=8,
        accumulate_grad_batches=1,
        devices=2,
        max_epochs=2,
        data_order={**order, "seed": 7},
    )
    changes = plan_changes(saved, now)
    assert changes[:2] == ["world_size 1 -> 2", "--data.seed 42 -> 7"]
    assert "batches_per_epoch 10 -> 5" in changes
    assert plan_changes(now.to_dict(), now) == []


@pytest.mark.parametrize("accumulate", [1, 3])
def test_token_budget_rounds_up_to_whole_steps_and_reports_tokens(accumulate):
    # 2 ranks x batch 4 x 129 tokens: 1032 tokens per batch row; 10 batches per rank.
    plan = make_plan(
        batches_per_epoch=10,
        batch_size=4,
        accumulate_grad_batches=accumulate,
        devices=2,
        tokens_per_sample=129,
        max_tokens=50_000,
    )
    assert plan.length_from == "max_tokens" and plan.max_tokens == 50_000
    assert plan.global_tokens_per_step == 4 * 2 * accumulate * 129
    samples = -(-50_000 // 129)  # 388 samples: 48.5 global batches of 8 -> 49 batches
    batches = -(-samples // 8)
    epochs, rest = divmod(batches, 10)
    assert plan.max_steps == epochs * plan.steps_per_epoch + -(-rest // accumulate)
    assert {"tokens_per_sample", "global_tokens_per_step", "max_tokens"} <= plan.to_dict().keys()
    assert (
        "tokens_per_sample"
        not in make_plan(
            batches_per_epoch=10, batch_size=4, accumulate_grad_batches=1, max_epochs=1
        ).to_dict()
    )


@pytest.mark.parametrize(
    "world_size,batch_size,accumulate", [(1, 8, 8), (2, 8, 4), (4, 16, 1), (8, 2, 4)]
)
def test_global_batch_derives_the_accumulation_for_any_layout(world_size, batch_size, accumulate):
    assert accumulation_for(64, world_size, batch_size, None) == accumulate
    assert accumulation_for(64, world_size, batch_size, 1) == accumulate  # the config default


def test_a_global_batch_the_layout_cannot_divide_names_a_batch_size_that_works():
    # 96 over 3 ranks: batch 7 does not divide it; 4 is the largest batch <= 7 that does
    with pytest.raises(PlanError, match=r"not a whole number of .* 3 x 7 = 21: .* e\.g\. 4$"):
        accumulation_for(96, 3, 7, None)
    with pytest.raises(PlanError, match="--trainer.accumulate_grad_batches=3: set only one"):
        accumulation_for(64, 2, 8, 3)
