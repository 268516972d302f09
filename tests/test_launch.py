"""Launchers on one host with real processes on CPU (gloo): Lightning's own, torchrun on
one and two "nodes", and the guard rails that stop a mismatched launch with one line.
SLURM runs on a real cluster in test_slurm.py; two hosts over a network in test_hosts.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    assert_each_sample_once_per_epoch,
    fit_args,
    free_port,
    read_samples,
    run,
    train_cmd,
    write_shards,
)

pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("launch-shards"), 203)  # uneven on purpose


@pytest.mark.slow  # a torchrun launch (two hosts: tests/test_hosts.py)
def test_torchrun_two_processes_see_every_sample_once(tmp_path, shards):
    run_dir = tmp_path / "run"
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "train.py"),
            *fit_args(run_dir, shards, "--trainer.devices", "2"),
        ],
        timeout=400,
    )
    plan = assert_each_sample_once_per_epoch(run_dir, 203, 2)
    assert plan["world_size"] == 2 and plan["max_steps"] == 2 * plan["steps_per_epoch"]


@pytest.mark.parametrize(
    "env,args,message",
    [
        pytest.param(
            {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "x"},
            ["--trainer.devices", "1"],
            "SLURM started 2 tasks but --trainer.devices x --trainer.num_nodes = 1 x 1 = 1",
            marks=pytest.mark.slow,  # a process start; also the catalogue's row 22
        ),
        pytest.param(
            {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "x"},
            [],
            "was not started with srun",
            marks=pytest.mark.slow,
        ),
        (
            {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0"},
            ["--trainer.devices", "4"],
            "torchrun started 2 processes but",
        ),
    ],
)
def test_launch_guard_rails(tmp_path, shards, env, args, message):
    result = run(train_cmd("fit", tmp_path, shards, *args, config="ddp"), env=env, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_world_size_too_large_for_the_data(tmp_path):
    shards = write_shards(tmp_path / "small", 10)
    result = run(
        train_cmd(
            "plan",
            tmp_path,
            shards,
            "--trainer.devices",
            "2",
            "--data.batch_size",
            "8",
            "--data.drop_last",
            "true",
            config="ddp",
        ),
        check=False,
    )
    assert result.returncode == 2 and "fewer than one global batch of 16" in result.stderr


@pytest.mark.slow  # four processes started only to be refused
def test_an_evaluation_split_too_small_for_the_ranks_is_one_line(tmp_path):
    """docs/errors.md row 46: 16 'val' samples on 4 ranks in batches of 8."""
    shards = write_shards(tmp_path / "data", 64, num_val=16)
    args = ["--trainer.accelerator", "cpu", "--trainer.devices", "4", "--data.batch_size", "8"]
    result = run(train_cmd("fit", tmp_path / "run", shards, *args, config="ddp"), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors and errors[0].endswith(
        "the 'val' split has 16 samples: litdata gives each of 4 ranks whole batches of "
        "--data.batch_size=8, which leaves rank 0 none: use a smaller batch size, fewer "
        "devices, or more 'val' data"
    ), result.stderr[-3000:]


def test_sbatch_script_is_valid_shell():
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert subprocess.run([str(shellcheck), str(script)]).returncode == 0


# litdata's own split (--data.global_order false), not the default: test_even_batches covers
# its padding in-process by default; the global order's 2-rank runs are test_layout_change's.
@pytest.mark.slow
@pytest.mark.parametrize("drop_last", ["true", "false"])
def test_lightning_launcher_uneven_samples_plan_matches_execution(tmp_path, shards, drop_last):
    """203 samples on 2 ranks. drop_last true: litdata trims both ranks to 12 batches.
    false: litdata splits 96/107 samples (12 vs 14 batches) and the short rank is padded
    with repeated samples. Either way: the same plan on both ranks and from the dry run,
    each rank yields exactly batches_per_epoch batches per epoch, global_step ==
    max_steps, and without drop_last every sample is trained on in every epoch."""
    run_dir = tmp_path / "run"
    args = fit_args(
        run_dir, shards, "--trainer.devices", "2", "--data.drop_last", drop_last,
        "--data.global_order", "false",  # litdata's own split, padded (the global order: test_layout_change)
    )  # fmt: skip
    run([sys.executable, str(REPO / "train.py"), *args], timeout=400)
    plans = [
        json.loads(p.read_text()) for p in sorted((run_dir / "samples").glob("plan-rank*.json"))
    ]
    assert len(plans) == 2 and plans[0] == plans[1]
    plan = plans[0]
    dry = run([sys.executable, str(REPO / "train.py"), "plan", *args[1:], "--json", "true"])
    assert json.loads(dry.stdout[dry.stdout.index("{") :]) == plan
    records = read_samples(run_dir)
    for epoch in range(plan["epochs"]):
        seen = set()
        for rank in range(2):
            batches = [rec for k, rec in records.items() if k[0] == rank and k[1] == epoch]
            assert len(batches) == plan["batches_per_epoch"]
            seen.update(i for rec in batches for i in rec["ids"])
        assert len(seen) == plan["samples_per_epoch"]
        if drop_last == "false":
            assert plan["samples_per_epoch"] == 203 and seen == set(range(203))
    assert (
        torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == plan["max_steps"]
    )


def test_under_torchrun_devices_auto_take_the_launchers_layout():
    from train_template.errors import UserError
    from train_template.launch import torchrun_layout

    env = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "3"}
    assert torchrun_layout("auto", 1, env) == (2, 3)
    assert torchrun_layout("auto", 3, env) == (2, 3)
    assert torchrun_layout(4, 1, env) == (4, 1)  # explicit: kept, and checked against WORLD_SIZE
    assert torchrun_layout("auto", 1, {}) == ("auto", 1)  # not under torchrun
    with pytest.raises(UserError, match="torchrun started 3 node"):
        torchrun_layout("auto", 2, env)


def test_a_lost_peer_is_named_in_one_line_and_other_errors_are_not():
    from train_template.distributed import lost_peer_line

    gloo = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv operation to complete"
    assert "no answer from a peer for 15 s" in lost_peer_line(RuntimeError(gloo))
    closed = "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.213.0.2]:4711"
    assert "the peer at 10.213.0.2 closed its connection" in lost_peer_line(RuntimeError(closed))
    pair = "Application timeout caused pair closure"  # gloo, as torch 2.15 raises it
    assert "no answer from a peer" in lost_peer_line(RuntimeError(pair))
    assert lost_peer_line(RuntimeError("CUDA out of memory")) is None
    assert lost_peer_line(ValueError("Connection reset by peer (gloo)")) is None
