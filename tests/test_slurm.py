"""scripts/slurm/train.sbatch on a real SLURM cluster (Debian's slurmctld, two slurmd
emulating nodes n1 and n2, munge), submitted with sbatch from the repository root as a
user does: two nodes x one task; one job requeued twice, by SIGUSR1 (save at a step
boundary -> scontrol requeue -> resume) and by a real preemption from a higher-priority
partition, ends with the same weights and samples as an uninterrupted job.

The cluster (tests/cluster.py) starts in ~1.5 s, plus ~8 s of apt-get the first time
on a machine; every daemon is stopped by its pid at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import FINISHED, slurm_cluster
from conftest import (
    MODEL_AND_DATA,
    REPO,
    assert_each_sample_once_per_epoch,
    assert_same_weights,
    fit_args,
    free_port,
    read_samples,
    write_shards,
)

pytestmark = [pytest.mark.ddp, pytest.mark.slurm]
SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
STEPS = 36  # 203 samples, 2 ranks x 8, drop_last: 12 steps per epoch, 3 epochs
LONGER = ["--trainer.max_epochs", "3"]  # room for a preemption to land mid-run


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster([free_port() for _ in range(3)]) as started:
        yield started


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("slurm-shards"), 203)


def submit(cluster, run_dir: Path, shards: Path, *sbatch: str) -> str:
    """sbatch from the repository root, as the README says; returns the job id."""
    args = fit_args(run_dir, shards, *LONGER)[1:]  # the script adds "fit" itself
    config = args.index("--config")
    script_args = [args[config + 1], *args[:config], *args[config + 2 :]]
    env = {**cluster.env, "PYTHON": sys.executable, "RUN_DIR": str(run_dir)}
    sbatch = ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", *sbatch]
    result = subprocess.run(
        [*sbatch, str(SCRIPT), *script_args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def output_of(job_id: str) -> Path:
    return REPO / f"slurm-train-template-{job_id}.out"


def steps_recorded(run_dir: Path) -> list[int]:
    path = run_dir / "samples" / "samples-rank0.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def wait_for_step(cluster, job_id: str, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Until rank 0 has trained past ``step`` in the job's current run."""
    deadline = time.monotonic() + timeout
    while not any(s > step for s in steps_recorded(run_dir)):
        job = cluster.job(job_id)
        assert job.get("JobState") not in FINISHED, (job, output_of(job_id).read_text()[-3000:])
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def finish(cluster, job_id: str) -> tuple[dict, str]:
    job = cluster.wait_job(job_id, FINISHED, timeout=400)
    out = output_of(job_id)
    text = out.read_text() if out.exists() else ""
    out.unlink(missing_ok=True)
    assert job["JobState"] == "COMPLETED", (job, text[-4000:])
    return job, text


@pytest.fixture(scope="module")
def reference(cluster, shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    job, text = finish(cluster, submit(cluster, run_dir, shards))
    assert "(restart 0): 2 node(s) x 1 task(s) on n[1-2]" in text
    return run_dir


def test_sbatch_from_the_repository_trains_on_two_nodes(reference):
    plan = assert_each_sample_once_per_epoch(reference, 203, 2)
    assert plan["world_size"] == 2 and plan["num_nodes"] == 2 and plan["max_steps"] == STEPS


def resumed_at(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed at global step (\d+) of", text)]


def wait_until_resumed(cluster, job_id: str, run_dir: Path, resumes: int) -> None:
    """Until the job's restart number ``resumes`` trains past the step it resumed at."""
    wait_for_restarts(cluster, job_id, resumes)
    deadline = time.monotonic() + 200
    while len(resumed_at(output_of(job_id).read_text())) < resumes:
        assert time.monotonic() < deadline, cluster.job(job_id)
        time.sleep(0.1)
    wait_for_step(cluster, job_id, run_dir, resumed_at(output_of(job_id).read_text())[-1] + 1)


def assert_like_the_reference(reference: Path, run_dir: Path) -> None:
    assert_same_weights(reference, run_dir)
    assert {k: v["ids"] for k, v in read_samples(reference).items()} == {
        k: v["ids"] for k, v in read_samples(run_dir).items()
    }


@pytest.mark.slow  # two requeues of a real SLURM job: 42 s (the quick subset keeps one preemption)
def test_sigusr1_twice_saves_requeues_and_resumes_exactly(cluster, shards, reference, tmp_path):
    """SIGUSR1 (what --signal=SIGUSR1@90 sends): every rank saves at the next agreed step
    boundary and rank 0 requeues with scontrol; twice."""
    run_dir = tmp_path / "requeued"
    job_id = submit(cluster, run_dir, shards)
    wait_for_step(cluster, job_id, run_dir, 5)
    cluster.cmd("scancel", "-s", "USR1", job_id)
    wait_until_resumed(cluster, job_id, run_dir, 1)
    cluster.cmd("scancel", "-s", "USR1", job_id)
    job, text = finish(cluster, job_id)
    assert job["Restarts"] == "2" and job["JobId"] == job_id
    for restart in range(3):
        assert f"(restart {restart}): 2 node(s) x 1 task(s)" in text
    assert text.count("SIGUSR1: saved") == 2 and text.count(f"scontrol requeue {job_id}") == 2
    assert len(resumed_at(text)) == 2, text[-3000:]
    first, second = resumed_at(text)
    # Both saves at an agreed boundary (every 5 steps on several ranks), mid-epoch, after
    # the signal: no other checkpoint exists there (end-of-epoch checkpoints only).
    assert 5 < first < second < STEPS and first % 5 == 0 and second % 5 == 0, text[-3000:]
    assert_like_the_reference(reference, run_dir)


def job_processes(job_id: str) -> list[int]:
    """The pids of the job's training processes (both emulated nodes run on this machine)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # not a process, or one that ended meanwhile
        argv = cmdline.split(b"\0")
        if f"SLURM_JOB_ID={job_id}".encode() in environ and argv[:2] == [
            sys.executable.encode(),
            b"train.py",
        ]:  # the tasks srun started, not srun itself
            pids.append(int(proc.name))
    return pids


def test_a_real_preemption_requeues_and_resumes_exactly(cluster, shards, reference, tmp_path):
    """A job on the urgent partition (PriorityTier 10) takes both nodes whole: slurmctld
    requeues the training job (PreemptMode=REQUEUE) and sends its tasks SIGTERM, which
    save at the next agreed step boundary within KillWait (30 s). (With a partition
    GraceTime SLURM would not requeue a job that ends within the grace time itself.)

    The training is frozen (SIGSTOP) from step 5 until slurmctld has acted: the
    preemption is decided on the scheduler's cycle, and under load the 31 remaining steps
    could end first (1 run in 4 did before the freeze). The SIGTERM waits as a pending
    signal; slurmd sends SIGCONT before it when it ends tasks, and so does the test."""
    run_dir = tmp_path / "preempted"
    job_id = submit(cluster, run_dir, shards)
    wait_for_step(cluster, job_id, run_dir, 5)
    frozen = job_processes(job_id)
    assert len(frozen) == 2, frozen  # one task per node
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        urgent = cluster.cmd(
            "sbatch", "--parsable", "-p", "urgent", "--nodes", "2",
            "--exclusive",  # both nodes whole: the training job must make room
            "--output", os.devnull, "--wrap", "sleep 2",
        ).stdout.strip()  # fmt: skip
        deadline = time.monotonic() + 120
        while (
            cluster.job(job_id).get("JobState") == "RUNNING"
            and int(cluster.job(job_id).get("Restarts", 0)) == 0
        ):
            assert time.monotonic() < deadline, cluster.job(job_id)
            time.sleep(0.05)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    wait_until_resumed(cluster, job_id, run_dir, 1)
    assert cluster.wait_job(urgent, FINISHED, timeout=200)["JobState"] == "COMPLETED"
    job, text = finish(cluster, job_id)
    assert job["Restarts"] == "1" and "DUE TO PREEMPTION" in text
    assert "SIGTERM: saved" in text, text[-3000:]
    assert [step % 5 for step in resumed_at(text)] == [0], text[-3000:]
    assert_like_the_reference(reference, run_dir)


def wait_for_restarts(cluster, job_id: str, restarts: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while int(cluster.job(job_id).get("Restarts", 0)) < restarts:
        assert time.monotonic() < deadline, cluster.job(job_id)
        time.sleep(0.1)


@pytest.mark.slow  # a job array of two sweep workers, four trials: 22 s
def test_an_array_of_two_sweep_workers_shares_one_study(cluster, shards, tmp_path):
    """``sbatch --array=0-1 scripts/slurm/sweep.sbatch``: two array tasks, one on each
    node, take the trials of one study (its journal file on the shared filesystem) until
    it has ``n_trials``; each trial is a job step (srun) of its task."""
    import optuna
    import yaml

    from train_template.sweep_trial import open_storage

    sweep_dir = tmp_path / "sweep"
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {"sweep": {"space": {"model.init_args.lr": {"float": [0.01, 0.2]}}, "pruner": "none"}}
        )
    )
    args = [
        *MODEL_AND_DATA, "--data.data_dir", str(shards), "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
        "--config", str(space), "--sweep.dir", str(sweep_dir), "--sweep.n_trials", "4",
        "--sweep.metric", "val_loss", "--sweep.direction", "minimize",
    ]  # fmt: skip
    env = {**os.environ, **cluster.env, "PYTHON": sys.executable}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--nodes", "1", "--ntasks-per-node", "1",
         str(REPO / "scripts" / "slurm" / "sweep.sbatch"), *args],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip().split(";")[0]
    for task in ("0", "1"):
        job = cluster.wait_job(f"{array}_{task}", FINISHED, timeout=400)
        out = REPO / f"slurm-train-template-sweep-{array}_{task}.out"
        text = out.read_text() if out.exists() else ""
        out.unlink(missing_ok=True)
        assert job["JobState"] == "COMPLETED", (job, text[-4000:])
        assert f"sweep worker {task} of job {array}" in text
    storage = open_storage(str(sweep_dir / "study.journal"))
    trials = optuna.load_study(study_name="sweep", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # n_trials, not one more
    assert {t.user_attrs["worker"] for t in trials} == {"0", "1"}  # both tasks took trials
