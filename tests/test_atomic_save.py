"""A checkpoint is complete or absent on any filesystem (``atomic_save.py``): a full disk
ends the run in one line with nothing partial left under a checkpoint's name and the
older checkpoints kept; the relaunch resumes; the system temp directory on another, small
filesystem plays no part in a save. Real filesystems: tmpfs mounts of a few hundred KB."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    error_line,
    fill,
    kill_after_checkpoint,
    last_step,
    run,
    train_cmd,
    write_shards,
)

from train_template.checkpoint_files import checkpoint_progress, newest_complete_checkpoint

ARGS = [
    "--trainer.max_epochs", "2", "--data.batch_size", "8", "--checkpoint.every_n_train_steps", "3",
    "--model.hidden", "4096",  # a checkpoint of 2.4 MB: the logs' writes are small beside it
]  # fmt: skip
FSDP2_ON_CPU = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.precision",
    "32-true",
    "--trainer.devices",
    "2",
]


@pytest.mark.parametrize(
    "layout",
    [
        "one-process-file",
        # each rank's shard through torch.distributed.checkpoint: its CheckpointException
        pytest.param("fsdp2-folder", marks=[pytest.mark.ddp, pytest.mark.slow]),
    ],
)
def test_a_full_disk_ends_the_run_in_one_line_and_the_relaunch_resumes(
    tmp_path, small_filesystem, cli_in_process, layout
):
    data = write_shards(tmp_path / "data", 128)
    run_dir = small_filesystem("run", "16m")  # the run directory on its own small disk
    sharded = layout == "fsdp2-folder"
    args = (
        [*ARGS, "--model", "plain_lightning.ShardedDocsModule", *FSDP2_ON_CPU] if sharded else ARGS
    )
    fit = train_cmd("fit", run_dir, data, *args, config="fsdp" if sharded else None)
    steps = 16 if sharded else 32
    killed_at = kill_after_checkpoint(fit, run_dir, 3)
    checkpoints = run_dir / "checkpoints"
    before = {p.name: checkpoint_progress(str(p)) for p in checkpoints.glob("*.ckpt")}

    filler = fill(run_dir, leave=2**20)  # room for the logs, not for a checkpoint
    if sharded:
        result = run([*fit, "--ckpt_path", "auto"], check=False)
        status, stderr = result.returncode, result.stderr
    else:
        status, _, stderr = cli_in_process([*fit[2:], "--ckpt_path", "auto"])
    assert status == 2, stderr[-3000:]
    line = error_line(stderr)
    assert line.startswith(f"error: cannot save checkpoint {checkpoints}/"), line
    assert "No space left on device (it needs about" in line and "free there)" in line
    for other in (e for e in stderr.splitlines() if e.startswith("error (rank")):
        assert "cannot save checkpoint" in other and "No space left on device" in other, other
    assert "Traceback" not in stderr
    assert not list(checkpoints.glob("*.partial"))  # nothing partial under any name
    assert {p.name: checkpoint_progress(str(p)) for p in checkpoints.glob("*.ckpt")} == before

    filler.unlink()
    # The system temp directory on another filesystem, too small for one checkpoint:
    # a save writes beside its destination, never there.
    tmp = small_filesystem("tmp", "16k")
    resumed = run([*fit, "--ckpt_path", "auto"], env={"TMPDIR": str(tmp)})
    assert f"resumed at global step {killed_at} of {steps}" in resumed.stdout + resumed.stderr
    assert last_step(run_dir) == steps
    last = checkpoints / "last.ckpt"
    assert sum(p.stat().st_size for p in [last, *last.glob("*")] if p.is_file()) > 2**20


def kill_during_save(command: list[str], checkpoints: Path) -> tuple[str, int]:
    """Start ``command`` and SIGKILL its process group while a save is being written (a
    ``*.partial`` beside the checkpoints); returns the partial's name and the newest complete
    checkpoint's step. Tried again (resuming) when the kill came after the rename."""
    for _ in range(3):
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        # After the first complete save (a last.ckpt is only ever complete) ...
        while not (
            (checkpoints / "last.ckpt").exists()
            and (partials := list(checkpoints.glob("*.partial")))
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "no save to kill"
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if partials[0].exists():  # ... the kill landed mid-save
            newest = newest_complete_checkpoint(str(checkpoints))
            return partials[0].name, checkpoint_progress(newest)[0]
        command = [*command, "--ckpt_path", "auto"]
    raise AssertionError("three kills missed every save")


@pytest.mark.parametrize(
    "layout",
    [
        # slow (out of the quick subset; CI runs them): a reference run, a kill and a resume
        pytest.param("one-process-file", marks=pytest.mark.slow),
        pytest.param("fsdp2-folder", marks=[pytest.mark.ddp, pytest.mark.slow]),
    ],
)
def test_a_kill_during_a_save_leaves_the_newest_complete_checkpoint(tmp_path, layout):
    data = write_shards(tmp_path / "data", 128)
    run_dir = tmp_path / "run"
    big = [*ARGS, "--model.hidden", "16384"]  # ~10 MB a checkpoint: a save lasts a while
    if layout == "fsdp2-folder":
        big = [*big, "--model", "plain_lightning.ShardedDocsModule", *FSDP2_ON_CPU]
    fit = train_cmd("fit", run_dir, data, *big, config="fsdp" if "fsdp" in layout else None)
    partial, complete = kill_during_save(fit, run_dir / "checkpoints")
    name = partial.removesuffix(".partial")
    assert not (run_dir / "checkpoints" / name).exists() or name == "last.ckpt"

    resumed = run([*fit, "--ckpt_path", "auto"])
    output = resumed.stdout + resumed.stderr
    assert f"resumed at global step {complete} of" in output
    assert last_step(run_dir) == (16 if "fsdp" in layout else 32)
    assert not list((run_dir / "checkpoints").glob("*.partial"))  # the save of its name replaced it
