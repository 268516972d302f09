"""A relaunch never dead-ends and never loses exactness: with ``last.ckpt`` missing or
damaged, ``--ckpt_path auto`` and ``last`` resume from the newest complete checkpoint
(leaving the damaged file in place, renamed) and end bitwise identical to an
uninterrupted run; SIGTERM inside an accumulation window saves at the window's end and
resumes bitwise identical, with one process and with two."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    CPU_DDP,
    REPO,
    assert_same_weights,
    kill_after_checkpoint,
    read_samples,
    run,
    write_shards,
)
from test_resume import fit_args

from train_template.checkpoint_files import read_checkpoint

EPOCH_STEPS = 51  # 403 samples, batch 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("recovery-shards"), 403)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, shards):
    """An uninterrupted reference, and a run killed after its first epoch's checkpoints
    (the top-k file epoch000-step000051.ckpt and last.ckpt, the same state)."""
    root = tmp_path_factory.mktemp("interrupted")
    reference, killed = root / "reference", root / "killed"
    run(fit_args(reference, shards))
    step = kill_after_checkpoint(fit_args(killed, shards), killed, EPOCH_STEPS)
    assert step == EPOCH_STEPS
    return reference, killed


@pytest.mark.parametrize(
    "damage,ckpt_path",
    [
        pytest.param("missing", "auto", marks=pytest.mark.slow),
        ("truncated", "last"),
        pytest.param("truncated", "auto", marks=pytest.mark.slow),
        pytest.param("missing", "last", marks=pytest.mark.slow),
    ],
)
def test_missing_or_damaged_last_ckpt_resumes_from_newest_complete(
    tmp_path, shards, interrupted, damage, ckpt_path
):
    reference, killed = interrupted
    run_dir = tmp_path / "run"
    shutil.copytree(killed, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    damaged_bytes = last.read_bytes()[: last.stat().st_size // 2]
    if damage == "missing":
        last.unlink()
    else:
        last.write_bytes(damaged_bytes)

    result = run(fit_args(run_dir, shards, "--ckpt_path", ckpt_path))

    assert (
        "resuming from epoch000-step000051.ckpt (global step 51)" in result.stdout + result.stderr
    )
    assert_same_weights(reference, run_dir)
    if damage == "truncated":  # kept, never overwritten
        assert (run_dir / "checkpoints" / "last.ckpt.damaged").read_bytes() == damaged_bytes


def test_only_damaged_checkpoints_are_never_overwritten(tmp_path, shards, interrupted):
    _, killed = interrupted
    run_dir = tmp_path / "run"
    shutil.copytree(killed, run_dir)
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"not a checkpoint")
    result = run(fit_args(run_dir, shards, "--ckpt_path", "auto"), check=False)
    assert result.returncode == 2 and "holds only damaged checkpoints" in result.stderr
    assert all(p.read_bytes() == b"not a checkpoint" for p in (run_dir / "checkpoints").iterdir())


def send_sigterm_mid_window(cmd: list[str], run_dir: Path, after_batches: int) -> int:
    """SIGTERM the launching process (rank 0) once it has trained ``after_batches``
    batches of its first epoch; returns its exit status."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    samples = run_dir / "samples" / "samples-rank0.jsonl"
    deadline = time.monotonic() + 300
    while not samples.exists() or len(samples.read_text().splitlines()) < after_batches:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a stuck run behind
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow  # a reference run, a SIGTERM and a resume per layout
@pytest.mark.parametrize(
    "layout",
    [
        "one-process",
        pytest.param("ddp", marks=pytest.mark.ddp),
        pytest.param("fsdp2", marks=pytest.mark.ddp),
    ],
)
def test_sigterm_inside_accumulation_window_resumes_bitwise(tmp_path, shards, layout):
    """accumulate 8, batch 8: the signal lands after batch 11 (inside the second window);
    the save waits for a window's end, so no accumulated gradient is lost. FSDP2: every
    rank saves its shard of the preemption checkpoint, and the relaunch loads it."""
    extra = ["--trainer.accumulate_grad_batches", "8"]
    config = {"one-process": None, "ddp": "ddp", "fsdp2": "fsdp"}[layout]
    world_size = 1 if layout == "one-process" else 2
    if layout == "ddp":
        extra += CPU_DDP
    if layout == "fsdp2":
        extra += [*CPU_DDP[:4], "--model", "plain_lightning.ShardedDocsModule"]
        extra += ["--trainer.precision", "32-true"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(fit_args(reference, shards, *extra, config=config))
    status = send_sigterm_mid_window(fit_args(resumed, shards, *extra, config=config), resumed, 11)
    assert status == 128 + signal.SIGTERM
    saved = read_checkpoint(str(resumed / "checkpoints" / "last.ckpt"))
    # "processed": Lightning counts the batch being saved as completed only after its hooks.
    batches_done = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    batches_per_epoch = {1: 51, 2: 26}[world_size]
    assert batches_done % 8 == 0 or batches_done == batches_per_epoch, "saved inside a window"
    assert 0 < saved["global_step"] < 3 * {1: 7, 2: 4}[world_size], "saved before the end"
    # The LR of every step trained before the save reaches metrics.csv, also those since
    # the last logging step (steps.StepLRLog hands them over when the fit stops).
    (log_dir,) = (resumed / "logs").glob("version_*")
    rows = csv.DictReader(open(log_dir / "metrics.csv"))
    lr_steps = [int(row["step"]) for row in rows if row.get("lr-SGD")]
    assert lr_steps == list(range(saved["global_step"]))

    run(fit_args(resumed, shards, *extra, "--ckpt_path", "auto", config=config))
    assert_same_weights(reference, resumed)
    ref, res = read_samples(reference), read_samples(resumed)
    assert {k: v["ids"] for k, v in ref.items()} == {k: v["ids"] for k, v in res.items()}
