"""Every documented launcher works with real processes on CPU (gloo): torchrun on one and
two "nodes", SLURM through the sbatch script with a stand-in srun, preemption with
requeue, and the guard rails that stop a mismatched launch with one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_samples, recorder_config, run, train_cmd, write_shards

pytestmark = pytest.mark.ddp
STANDINS = REPO / "tests" / "standins"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("launch-shards"), 203)  # uneven on purpose


def fit_args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    cmd = train_cmd(
        "fit",
        run_dir,
        data,
        "--config",
        str(recorder_config(run_dir)),
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "2",
        "--data.batch_size",
        "8",
        "--data.drop_last",
        "true",  # litdata trims every rank to whole batches (padding: the uneven test)
        *extra,
        config="ddp",
    )
    return cmd[2:]  # without python and train.py: launchers add their own


def assert_each_sample_once_per_epoch(run_dir: Path, num_train: int, world_size: int) -> dict:
    plans = [
        json.loads(p.read_text()) for p in sorted((run_dir / "samples").glob("plan-rank*.json"))
    ]
    assert len(plans) == world_size and all(plan == plans[0] for plan in plans)
    plan = plans[0]
    records = read_samples(run_dir)
    for epoch in range(plan["epochs"]):
        per_rank = [
            [
                i
                for (r, e, _), rec in sorted(records.items())
                if r == rank and e == epoch
                for i in rec["ids"]
            ]
            for rank in range(world_size)
        ]
        assert all(len(ids) == plan["batches_per_epoch"] * 8 for ids in per_rank)
        union = set().union(*map(set, per_rank))
        assert sum(map(len, per_rank)) == len(union), "ranks overlap"
        assert len(union) == plan["samples_per_epoch"] and union <= set(range(num_train))
        assert num_train - len(union) < world_size * 8  # drop_last drops less than a batch per rank
    return plan


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


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost(tmp_path, shards):
    run_dir, port = tmp_path / "run", free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(REPO / "train.py"),
                *fit_args(run_dir, shards, "--trainer.devices", "1", "--trainer.num_nodes", "2"),
            ],
            cwd=REPO,
            # What litdata infers on a multi-node GPU job (world size // GPUs per node);
            # on CPU it only reads NNODES. Epoch 2 then used to give both nodes the same data.
            env={**os.environ, "NNODES": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:]
    plan = assert_each_sample_once_per_epoch(run_dir, 203, 2)
    assert plan["num_nodes"] == 2


def slurm_env(tmp_path: Path, run_dir: Path, tasks: int = 2) -> dict:
    return {
        "PATH": f"{STANDINS}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "template-test",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": str(REPO),
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "RUN_DIR": str(run_dir),
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }


def sbatch_cmd(run_dir: Path, data: Path, *extra: str) -> list[str]:
    args = fit_args(run_dir, data, *extra)[1:]  # the script adds "fit" itself
    config_index = args.index("--config")
    return [
        "bash",
        str(REPO / "scripts" / "slurm" / "train.sbatch"),
        args[config_index + 1],
        *args[:config_index],
        *args[config_index + 2 :],
    ]


def test_sbatch_script_under_srun_environment(tmp_path, shards):
    run_dir = tmp_path / "run"
    result = run(sbatch_cmd(run_dir, shards), env=slurm_env(tmp_path, run_dir), timeout=400)
    assert "1 node(s) x 2 task(s)" in result.stdout
    plan = assert_each_sample_once_per_epoch(run_dir, 203, 2)
    assert plan["world_size"] == 2


def test_slurm_preemption_saves_requeues_and_resumes_exactly(tmp_path, shards):
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    run(sbatch_cmd(reference, shards), env=slurm_env(tmp_path / "ref", reference), timeout=400)

    env = {**os.environ, **slurm_env(tmp_path, preempted)}
    job = subprocess.Popen(
        sbatch_cmd(preempted, shards),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples = preempted / "samples" / "samples-rank0.jsonl"
    deadline = time.monotonic() + 300
    while (
        not samples.exists() or len(samples.read_text().splitlines()) < 16
    ):  # mid epoch 1 of 12 steps
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    ranks = subprocess.run(
        ["pgrep", "-g", str(job.pid), "-f", f"^{sys.executable} .*train.py fit"],
        capture_output=True,
        text=True,
    )
    for pid in ranks.stdout.split():
        os.kill(int(pid), signal.SIGUSR1)  # what SLURM's --signal=SIGUSR1@90 does to every task
    assert job.wait(timeout=120) == 0
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = torch.load(preempted / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < 24

    run(
        sbatch_cmd(preempted, shards), env=slurm_env(tmp_path, preempted), timeout=400
    )  # the requeued job
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(preempted / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    assert all(torch.equal(t, b["state_dict"][k]) for k, t in a["state_dict"].items())
    ref, res = read_samples(reference), read_samples(preempted)
    assert {k: v["ids"] for k, v in ref.items()} == {k: v["ids"] for k, v in res.items()}


@pytest.mark.parametrize(
    "env,args,message",
    [
        pytest.param(
            {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "x"},
            ["--trainer.devices", "1"],
            "SLURM started 2 tasks but --trainer.devices x --trainer.num_nodes = 1 x 1 = 1",
            marks=pytest.mark.slow,  # the catalogue's slurm-tasks-not-devices row, too
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
    assert result.returncode == 2 and "yields 0 batches per rank" in result.stderr


def test_sbatch_script_is_valid_shell():
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert (
        subprocess.run([str(shellcheck), str(script), *map(str, STANDINS.iterdir())]).returncode
        == 0
    )


@pytest.mark.parametrize("drop_last", [pytest.param("true", marks=pytest.mark.slow), "false"])
def test_lightning_launcher_uneven_samples_plan_matches_execution(tmp_path, shards, drop_last):
    """203 samples on 2 ranks. drop_last true: litdata trims both ranks to 12 batches.
    false: litdata splits 96/107 samples (12 vs 14 batches) and the short rank is padded
    with repeated samples. Either way: the same plan on both ranks and from the dry run,
    each rank yields exactly batches_per_epoch batches per epoch, global_step ==
    max_steps, and without drop_last every sample is trained on in every epoch."""
    run_dir = tmp_path / "run"
    args = fit_args(run_dir, shards, "--trainer.devices", "2", "--data.drop_last", drop_last)
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
