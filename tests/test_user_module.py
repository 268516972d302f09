"""A module and data module written the way Lightning's docs show, never having heard of
this template, get its guarantees through ``--model`` / ``--data``: the scheduler they
size from ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` is exactly
as long as the plan and the steps executed, whatever sets the length, and a SIGKILL
after a mid-epoch checkpoint of a plain map-style ``DataLoader`` resumes to
bitwise-identical weights (world size 1 and 2).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import (
    CPU_DDP,
    REPO,
    assert_same_weights,
    kill_after_checkpoint,
    load_plan,
    run,
    train_cmd,
    write_shards,
)

ENV = {"PYTHONPATH": str(REPO / "tests")}
USER_MODULE = ["--model", "plain_lightning.DocsStyleModule"]
MAP_STYLE_DATA = ["--data", "plain_lightning.MapStyleDataModule"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("user-module-shards"), 403, num_val=64)


def fit(run_dir: Path, data: Path, *extra: str, config: str | None = None, check: bool = True):
    return run(
        train_cmd("fit", run_dir, data, *USER_MODULE, *extra, config=config), env=ENV, check=check
    )


def scheduler_and_lrs(run_dir: Path) -> tuple[dict, dict, list[float]]:
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    metrics = sorted((run_dir / "logs").glob("version_*/metrics.csv"))[-1]
    lrs = [float(r["lr-SGD"]) for r in csv.DictReader(metrics.open()) if r.get("lr-SGD")]
    return last, last["lr_schedulers"][0], lrs


@pytest.mark.parametrize(
    "length_args,length_from",
    [
        pytest.param(
            ["--trainer.max_epochs", "2", "--trainer.accumulate_grad_batches", "3"],
            "max_epochs",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["--trainer.max_steps", "37", "--trainer.accumulate_grad_batches", "2"],
            "max_steps",
            marks=pytest.mark.slow,
        ),
        (
            ["--plan.max_samples", "1000", "--trainer.accumulate_grad_batches", "4"],
            "max_samples",
        ),
    ],
    ids=["epochs", "steps", "samples"],
)
def test_scheduler_from_estimated_stepping_batches_is_as_long_as_the_plan(
    tmp_path, shards, length_args, length_from
):
    """403 samples, batch 23, drop_last: whole global batches of 23 x accumulation."""
    run_dir = tmp_path / "run"
    fit(run_dir, shards, "--data.batch_size", "23", "--data.drop_last", "true", *length_args)
    plan = load_plan(run_dir)
    last, scheduler, lrs = scheduler_and_lrs(run_dir)
    accumulate = plan["accumulate_grad_batches"]
    assert plan["length_from"] == length_from
    assert plan["steps_per_epoch"] == 403 // (23 * accumulate)
    assert plan["batches_per_epoch"] == plan["steps_per_epoch"] * accumulate
    # OneCycleLR would raise if stepped past total_steps; here it ends exactly on it.
    assert scheduler["total_steps"] == plan["max_steps"] == last["global_step"]
    assert scheduler["last_epoch"] == plan["max_steps"]
    assert len(lrs) == plan["max_steps"]
    final_lr = 0.05 / 25 / 1e4  # OneCycleLR's max_lr / div_factor / final_div_factor
    assert lrs[-1] == pytest.approx(final_lr, rel=1e-6)


def test_map_style_data_module_gets_an_exact_plan(tmp_path, shards):
    """No litdata: the plan is measured on the real DataLoader, which trains in the global
    order (403 samples, batch 16, accumulate 4: 7 whole global batches of 64 per epoch,
    28 batches, the last window completed with the epoch's first samples)."""
    run_dir = tmp_path / "run"
    fit(
        run_dir,
        shards,
        *MAP_STYLE_DATA,
        "--data.batch_size",
        "16",
        "--trainer.max_epochs",
        "2",
        "--trainer.accumulate_grad_batches",
        "4",
    )
    plan = load_plan(run_dir)
    last, scheduler, lrs = scheduler_and_lrs(run_dir)
    assert (plan["batches_per_epoch"], plan["steps_per_epoch"], plan["max_steps"]) == (28, 7, 14)
    assert scheduler["total_steps"] == last["global_step"] == len(lrs) == 14


# slow (out of the quick subset; CI runs them): a reference run, a kill and a resume each.
@pytest.mark.parametrize(
    "world_size",
    [
        pytest.param(1, marks=pytest.mark.slow),
        pytest.param(2, marks=[pytest.mark.ddp, pytest.mark.slow]),
    ],
)
def test_sigkill_after_mid_epoch_checkpoint_resumes_bitwise(tmp_path, shards, world_size):
    """The docs-style module on the docs-style map-style data module: Lightning itself
    would restart the epoch's sampler; the template's sampler resumes mid-epoch."""
    extra = [
        *MAP_STYLE_DATA,
        "--data.batch_size",
        "23",
        "--trainer.max_epochs",
        "3",
        "--checkpoint.every_n_train_steps",
        "5",
    ]
    config = None
    if world_size == 2:
        config = "ddp"
        extra += CPU_DDP
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    fit(reference, shards, *extra, config=config)
    steps_per_epoch = load_plan(reference)["steps_per_epoch"]
    cmd = train_cmd("fit", resumed, shards, *USER_MODULE, *extra, config=config)
    killed_at = kill_after_checkpoint(cmd, resumed, steps_per_epoch + 3, env=ENV)
    assert killed_at % steps_per_epoch != 0, "the kill should land after a mid-epoch checkpoint"
    fit(resumed, shards, *extra, "--ckpt_path", "last", config=config)

    assert assert_same_weights(reference, resumed)["global_step"] == 3 * steps_per_epoch
