"""A run killed anywhere and resumed ends exactly as if it had never stopped.

Real processes, real SIGKILL: the uninterrupted run and the killed-and-resumed run
must train on the same sample ids in every step, with the same LR per step, reach
the same global_step and end with bit-identical weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    kill_after_checkpoint,
    read_samples,
    recorder_config,
    run,
    train_cmd,
    write_shards,
)

EPOCHS = "3"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 403 samples, batch 8: 51 batches per epoch (the last one short), 3 epochs; 4 KB
    # chunks of 50 samples (9 chunks), so that the global order's 2-chunk windows are five.
    return write_shards(tmp_path_factory.mktemp("resume-shards"), 403, chunk_bytes="4KB")


def fit_args(run_dir: Path, data: Path, *extra: str, config: str | None = None) -> list[str]:
    return train_cmd(
        "fit",
        run_dir,
        data,
        "--config",
        str(recorder_config(run_dir)),
        "--trainer.max_epochs",
        EPOCHS,
        "--data.batch_size",
        "8",
        *extra,
        config=config,
    )


def assert_same_run(reference: Path, resumed: Path) -> None:
    ref, res = read_samples(reference), read_samples(resumed)
    assert ref.keys() == res.keys()
    for key in ref:
        assert res[key]["ids"] == ref[key]["ids"], f"different samples at {key}"
        assert res[key]["lr"] == ref[key]["lr"], f"different LR at {key}"
        assert res[key]["global_step"] == ref[key]["global_step"]
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def epoch_orders(run_dir: Path, rank: int = 0) -> list[list[int]]:
    records = read_samples(run_dir)
    epochs = sorted({epoch for (r, epoch, _) in records if r == rank})
    return [
        [
            i
            for (r, e, b), rec in sorted(records.items())
            if r == rank and e == epoch
            for i in rec["ids"]
        ]
        for epoch in epochs
    ]


@pytest.mark.parametrize(
    "world_size,num_workers",
    [
        pytest.param(1, 0, marks=pytest.mark.slow),
        pytest.param(1, 2, marks=pytest.mark.slow),
        pytest.param(2, 0, marks=[pytest.mark.ddp, pytest.mark.slow]),
        pytest.param(2, 2, marks=[pytest.mark.ddp, pytest.mark.slow]),
    ],
)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(
    tmp_path, shards, world_size, num_workers
):
    extra = ["--data.num_workers", str(num_workers), "--checkpoint.every_n_train_steps", "7"]
    extra += ["--plan.shuffle_window", "2"]  # a window every 2 of the 9 chunks: five
    config = None
    if world_size == 2:
        config = "ddp"
        extra += ["--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(fit_args(reference, shards, *extra, config=config))

    steps_per_epoch = {1: 51, 2: 25}[world_size]
    killed_at = kill_after_checkpoint(
        fit_args(resumed, shards, *extra, config=config), resumed, steps_per_epoch + 10
    )
    assert killed_at % steps_per_epoch != 0, "the kill should land after a mid-epoch checkpoint"
    run(fit_args(resumed, shards, *extra, "--ckpt_path", "last", config=config))

    assert_same_run(reference, resumed)
    orders = epoch_orders(reference)
    assert orders[0] != orders[1], "shuffle should give each epoch its own order"


@pytest.mark.parametrize(
    "length",
    [
        pytest.param([], id="epochs", marks=pytest.mark.slow),
        pytest.param(["--trainer.max_steps", "153", "--trainer.max_epochs", "-1"], id="steps"),
    ],
)
def test_resume_from_end_of_epoch_checkpoint_continues_the_shuffle(tmp_path, shards, length):
    """With the length in steps too: Lightning restores an end-of-epoch checkpoint of a
    max_steps run as "iteration-based" and counted its epoch twice, so the resumed run
    stopped an epoch early (step 102 of 153, exit 0) until the plan held max_steps back
    during the restore."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(fit_args(reference, shards, *length))
    # Default checkpointing saves at epoch ends only: the kill lands right after epoch 1's.
    killed_at = kill_after_checkpoint(fit_args(resumed, shards, *length), resumed, 51)
    assert killed_at in (51, 102)
    run(fit_args(resumed, shards, *length, "--ckpt_path", "last"))

    assert_same_run(reference, resumed)
    orders = epoch_orders(resumed)
    assert len({tuple(order) for order in orders}) == 3, "each epoch its own order"
    # The resumed launch logs to a new version folder, TensorBoard beside CSV, and its
    # training.png is drawn from both launches' metrics.csv.
    versions = sorted((resumed / "logs").glob("version_*"))
    assert len(versions) == 2
    assert all(list(v.glob("events.out.tfevents.*")) for v in versions)
    assert (versions[-1] / "training.png").stat().st_size > 10_000


@pytest.mark.ddp
@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(tmp_path, shards):
    """litdata's own stream (``--data.global_order false``) cannot change layout: a changed
    world size stops with what changed, nothing else."""
    run_dir = tmp_path / "run"
    kill_after_checkpoint(
        fit_args(run_dir, shards, "--data.global_order", "false"), run_dir, 51
    )  # unfinished: 1 of 3 epochs
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    result = run(
        fit_args(
            run_dir,
            shards,
            "--ckpt_path",
            "last",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--data.global_order",
            "false",
        ),
        check=False,
    )
    assert result.returncode != 0
    assert "the checkpoint was trained with another plan (world_size 1 -> 2" in result.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


@pytest.mark.ddp
@pytest.mark.slow  # 48 s
def test_ddp_padded_rank_resumes_exactly_inside_and_before_its_padding(tmp_path):
    """2 ranks, 203 samples, batch 8, drop_last false: rank 0 yields 12 own batches and
    2 padding batches per epoch. Checkpoints at global steps 9 (rank 0 mid-stream) and
    27 (epoch 1, batch 12: rank 0 inside its padding) are each resumed in a new run
    directory; every later step trains on the same samples with the same LR as the
    uninterrupted run, and the final weights are identical."""
    shards = write_shards(tmp_path / "shards", 203)
    extra = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--data.drop_last",
        "false",
        "--data.global_order",
        "false",  # litdata's own split: rank 0 is padded
        "--checkpoint.every_n_train_steps",
        "9",
        "--checkpoint.monitor",
        "null",
        "--checkpoint.save_top_k",
        "-1",
    ]
    reference = tmp_path / "reference"
    run(fit_args(reference, shards, *extra, config="ddp"))
    ref = read_samples(reference)
    assert len([k for k in ref if k[0] == 0 and k[1] == 0]) == 14  # 12 own + 2 padding
    for step, epoch, batch in ((9, 0, 8), (27, 1, 12)):
        resumed = tmp_path / f"resumed-{step}"
        (checkpoint,) = (reference / "checkpoints").glob(f"*-step{step:06d}.ckpt")
        run(fit_args(resumed, shards, *extra, "--ckpt_path", str(checkpoint), config="ddp"))
        res = read_samples(resumed)
        assert ref[(0, epoch, batch)]["global_step"] == step
        assert res.keys() == {k for k, rec in ref.items() if rec["global_step"] > step}
        for key, record in res.items():
            assert (record["ids"], record["lr"]) == (ref[key]["ids"], ref[key]["lr"]), key
        a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
        b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
        assert a["global_step"] == b["global_step"] == 42
        for name, tensor in a["state_dict"].items():
            assert torch.equal(tensor, b["state_dict"][name]), name


@pytest.mark.slow  # three short fits
def test_a_checkpoint_of_the_order_before_windows_resumes_in_it_or_is_refused(tmp_path, shards):
    """A checkpoint written before the blockwise shuffle (its plan's data order has no
    shuffle window; made here by removing the key from a run of that order, which is all
    that differs) is never silently reshuffled: the default window is refused in one line
    (docs/errors.md row 65) that names the option, ``--plan.shuffle_window null``
    continues it exactly in its own order, one permutation of all 403 samples per epoch."""
    from train_template.order import GlobalOrder

    old_order = ["--plan.shuffle_window", "null", "--trainer.max_epochs", "2"]
    every = ["--checkpoint.every_n_train_steps", "7"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(fit_args(reference, shards, *old_order, *every))
    killed_at = kill_after_checkpoint(fit_args(resumed, shards, *old_order, *every), resumed, 60)
    assert killed_at % 51 != 0  # mid-epoch
    last = resumed / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    data_order = checkpoint["callbacks"]["RunMachinery"]["plan"]["data_order"]
    del data_order["shuffle_window"], data_order["shuffle_block"]
    torch.save(checkpoint, last)
    before = last.read_bytes()

    refused = run(
        fit_args(resumed, shards, "--trainer.max_epochs", "2", *every, "--ckpt_path", "last"),
        check=False,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the checkpoint was trained with another plan"), line
    assert "(--plan.shuffle_window null -> 64)" in line, line
    assert last.read_bytes() == before

    run(fit_args(resumed, shards, *old_order, *every, "--ckpt_path", "last"))
    assert_same_run(reference, resumed)
    full = GlobalOrder(403, 8, seed=42, shuffle_window=None)
    for epoch, order in enumerate(epoch_orders(reference)):
        assert order == full.epoch_order(epoch).tolist()
