"""Two hosts over a real network: network namespaces joined by a veth pair
(10.213.0.1, 10.213.0.2), one torchrun per host, gloo over the veth.

- 2 nodes x 1 process train to the end with a 2-node plan; a host killed mid-run (its
  connections reset) ends the other with one line, and a relaunch with ``--ckpt_path
  auto`` resumes bitwise.
- A link that goes down (packets just stop) ends both hosts after
  ``--distributed.timeout_s``, each with one line, instead of Lightning's 30 minutes.
- torchrun's elastic mode (``--nnodes 1:2``): a lost host -> torchrun restarts the
  workers on the host left, which resume with the same global batch and samples per step.

Set-up ~0.1 s per test; the namespaces are deleted by name and every process group
stopped by its pid at the end, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import two_hosts
from conftest import (
    REPO,
    assert_each_sample_once_per_epoch,
    assert_same_weights,
    fit_args,
    read_samples,
    write_shards,
)

pytestmark = [pytest.mark.ddp, pytest.mark.hosts]
MASTER = "10.213.0.1"


@pytest.fixture
def hosts():
    with two_hosts() as started:
        yield started


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("hosts-shards"), 203)


def torchrun(node_rank: int, nproc: int, run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """The README's two-node torchrun line for one host (devices and nodes: torchrun's)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
        "--master_addr", MASTER, "--master_port", "29500",
        str(REPO / "train.py"), *fit_args(run_dir, shards, *extra),
    ]  # fmt: skip


def start(hosts, logs: Path, name: str, commands: list[list[str]]) -> list[subprocess.Popen]:
    """One command per host; output in ``<logs>/<name>-host<i>.log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return [
        host.start(cmd, env, logs / f"{name}-host{i}.log", REPO)
        for i, (host, cmd) in enumerate(zip(hosts, commands, strict=True))
    ]


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [process.poll() for process in processes]


def wait_for_step(run_dir: Path, step: int, processes, timeout: float = 300) -> None:
    path = run_dir / "samples" / "samples-rank0.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if any(json.loads(line)["step"] > step for line in lines if line):
            return
        assert all(p.poll() is None for p in processes), "a host ended early"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def logs_of(logs: Path, name: str) -> list[str]:
    return [p.read_text() for p in sorted(logs.glob(f"{name}-host*.log"))]


def assert_one_line_from_the_worker(log: str, reason: str) -> None:
    """The worker said what happened in one line and printed no Python traceback (the
    lines after it are torchrun's own report that a worker failed)."""
    line = re.search(r"error( \(rank \d+\))?: a peer rank was lost \(([^)]*)\)", log)
    assert line and reason in line.group(2), log[-3000:]
    worker_part = log[: line.start()]
    assert "Traceback" not in worker_part, worker_part[-3000:]


@pytest.mark.slow  # a reference and two launches on two hosts
def test_two_hosts_train_and_a_killed_host_resumes_exactly(hosts, shards, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    every = ["--checkpoint.every_n_train_steps", "4"]
    runs = [torchrun(r, 1, reference, shards, *every) for r in (0, 1)]
    assert wait_all(start(hosts, tmp_path, "reference", runs), 400) == [0, 0], logs_of(
        tmp_path, "reference"
    )
    plan = assert_each_sample_once_per_epoch(reference, 203, 2)
    assert plan["num_nodes"] == 2 and plan["world_size"] == 2

    processes = start(
        hosts, tmp_path, "first", [torchrun(r, 1, killed, shards, *every) for r in (0, 1)]
    )
    wait_for_step(killed, 9, processes)
    hosts[1].kill()  # host 1 dies: the kernel resets its connections
    codes = wait_all(processes, 120)
    assert codes[0] not in (0, None) and codes[1] == -signal.SIGKILL, codes
    assert_one_line_from_the_worker(logs_of(tmp_path, "first")[0], "its connection")

    auto = ["--ckpt_path", "auto", *every]
    runs = [torchrun(r, 1, killed, shards, *auto) for r in (0, 1)]
    assert wait_all(start(hosts, tmp_path, "second", runs), 400) == [0, 0], logs_of(
        tmp_path, "second"
    )
    assert "Restored all states from the checkpoint" in logs_of(tmp_path, "second")[0]
    assert_same_weights(reference, killed)
    assert {k: v["ids"] for k, v in read_samples(reference).items()} == {
        k: v["ids"] for k, v in read_samples(killed).items()
    }


@pytest.mark.slow  # four processes on two hosts
def test_two_hosts_of_two_processes_train_to_the_end(hosts, tmp_path):
    run_dir = tmp_path / "run"
    # 4 ranks x 8: litdata gives whole batches per rank, so 16 val samples would leave
    # three ranks none (refused in one line by the data module).
    shards = write_shards(tmp_path / "shards", 203, num_val=64, num_test=64)
    runs = [torchrun(r, 2, run_dir, shards) for r in (0, 1)]
    assert wait_all(start(hosts, tmp_path, "run", runs), 500) == [0, 0], logs_of(tmp_path, "run")
    plan = assert_each_sample_once_per_epoch(run_dir, 203, 4)
    assert plan["num_nodes"] == 2 and plan["world_size"] == 4


def test_a_link_down_ends_both_hosts_after_the_timeout(hosts, shards, tmp_path):
    run_dir = tmp_path / "run"
    bounded = ["--distributed.timeout_s", "10"]
    runs = [torchrun(r, 1, run_dir, shards, *bounded) for r in (0, 1)]
    processes = start(hosts, tmp_path, "run", runs)
    wait_for_step(run_dir, 3, processes)
    hosts[1].link(up=False)  # packets just stop: no connection is reset
    codes = wait_all(processes, 240)  # a bound, not a timing: Lightning's default is 30 min
    assert None not in codes and 0 not in codes, codes
    for log in logs_of(tmp_path, "run"):
        # gloo says "Timed out waiting 10000ms" or "Application timeout caused pair closure"
        assert_one_line_from_the_worker(log, "no answer from a peer")


ELASTIC = [
    "--trainer.precision", "32-true",
    "--checkpoint.every_n_train_steps", "2",
]  # fmt: skip


def torchrun_elastic(host: int, run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """The README's elastic line: 1 to 2 nodes, one restart, c10d rendezvous on host 0.
    ``--local-addr``: the hosts share one hostname here, which resolves to neither."""
    conf = f"is_host={'true' if host == 0 else 'false'},last_call_timeout=5"
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1:2", "--nproc_per_node", "1", "--max-restarts", "1",
        "--local-addr", f"10.213.0.{host + 1}",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{MASTER}:29400", "--rdzv-id", "elastic",
        "--rdzv-conf", conf,
        str(REPO / "train.py"), *fit_args(run_dir, shards, *ELASTIC, *extra),
    ]  # fmt: skip


def steps_of(run_dir: Path) -> dict[tuple[int, int], tuple[list[int], float]]:
    """(epoch, step) -> (sorted sample ids of all ranks, LR); a later world size's
    records (the run after the restart) replace an earlier one's for the same step."""
    by_layout: dict[int, dict] = {}
    for path in sorted((run_dir / "samples").glob("samples-rank*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            steps = by_layout.setdefault(record["world_size"], {})
            key = (record["epoch"], record["step"])
            steps.setdefault(key, ([], record["lr"]))[0].extend(record["ids"])
    merged: dict = {}
    for world_size in sorted(by_layout, reverse=True):  # 2 nodes first, then 1
        merged.update({k: (sorted(ids), lr) for k, (ids, lr) in by_layout[world_size].items()})
    return merged


@pytest.mark.slow  # two hosts, a killed host and torchrun's restart on the one left: 43 s
def test_torchrun_elastic_restarts_on_the_host_left_with_the_same_global_batch(
    hosts, shards, tmp_path
):
    reference = tmp_path / "reference"
    one = [*ELASTIC, "--trainer.devices", "1", "--plan.global_batch_size", "16"]
    subprocess.run(
        [sys.executable, str(REPO / "train.py"), *fit_args(reference, shards, *one)],
        cwd=REPO, check=True, capture_output=True, timeout=400,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    runs = [torchrun_elastic(h, run_dir, shards, "--ckpt_path", "auto") for h in (0, 1)]
    processes = start(hosts, tmp_path, "elastic", runs)
    wait_for_step(run_dir, 9, processes)
    hosts[1].kill()
    assert wait_all(processes[:1], 400) == [0], logs_of(tmp_path, "elastic")[0][-5000:]
    log = logs_of(tmp_path, "elastic")[0]
    first, second = log.split("Training plan")[1:3]  # before and after the restart
    assert "world size                     2 (2 node(s) x 1 device(s))" in first
    assert "world size                     1 (1 node(s) x 1 device(s))" in second
    assert "accumulate grad batches        2" in second
    assert (
        "global batch size              16" in first
        and "global batch size              16" in second
    )
    expected, steps = steps_of(reference), steps_of(run_dir)
    assert steps.keys() == expected.keys()
    for key, (ids, lr) in expected.items():
        assert steps[key][0] == ids, key  # the same samples ...
        assert steps[key][1] == pytest.approx(lr, rel=1e-12), key  # ... and the same LR
