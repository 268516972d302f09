"""Shared fixtures: real litdata shards in tmp dirs and a helper to run train.py for real.

The machinery's tests train their own docs-style module (``plain_lightning.py``) on their
own tiny shards (``write_shards`` + ``shard_data.ShardData``), never the embedded examples:
they pass with the embedded examples deleted (``scripts/test.sh`` runs them in such a copy).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# CI replays the same examples every run; local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PYTHON = sys.executable
# The module and data every machinery test trains unless it says otherwise.
MODEL_AND_DATA = ["--model", "plain_lightning.DocsStyleModule", "--data", "shard_data.ShardData"]


@pytest.fixture(scope="module", autouse=True)
def machinery_defaults_only(request):
    """The machinery's tests see what a fork without the examples sees: no
    ``configs/default.yaml`` (the example's model, data and checkpoint monitor), in this
    checkout too. The examples' tests (``tests/examples``) train what it selects. Module
    scope: set before any module fixture starts a run."""
    if TESTS / "examples" in request.path.parents:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRAIN_TEMPLATE_DEFAULT_CONFIG", "")
        yield


@pytest.fixture(scope="session", autouse=True)
def test_modules_importable():
    """Every process a test starts (train.py, torchrun, srun) imports the tests' own
    modules by class path (``--model plain_lightning.DocsStyleModule``)."""
    paths = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(dict.fromkeys(paths)))
        yield


def _git_status() -> str | None:
    try:
        result = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def working_tree_stays_clean():
    """No run, test or benchmark writes into the checkout outside ignored folders: the
    suite ends with the same `git status` it started with."""
    before = _git_status()
    yield
    after = _git_status()
    if before is None or after is None:
        return
    new = sorted(set(after.splitlines()) - set(before.splitlines()))
    written = [line[3:] for line in new if line.startswith("??")]  # new files nobody ignores
    if written:
        pytest.fail(f"the test run wrote into the checkout: {written[:10]}")


def write_shards(
    root: Path, num_train: int, num_val: int = 16, num_test: int = 16, chunk_bytes: str = "1MB"
) -> Path:
    """Tiny real shards: train ids 0..num_train-1, then val and test ids after them."""
    from sklearn.datasets import load_digits

    from train_template.shards import write_in_process

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    start = 0
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        samples = (
            {
                "index": i,
                "image": images[i % len(images)].tobytes(),
                "label": int(digits.target[i % len(images)]),
            }
            for i in range(start, start + count)
        )
        write_in_process(samples, root / split, chunk_bytes=chunk_bytes)
        start += count
    return root


def prepare_shards(
    out: str,
    num_train: int,
    num_val: int = 16,
    num_test: int = 16,
    force: bool = False,
    chunk_bytes: str = "1MB",
) -> bool:
    """What a user's preparation script does with ``train_template.shards``: skip data that
    is up to date (fingerprint), else write every split into staging and swap them in (a
    local folder, or uploaded to an ``s3://`` URL, ``dataset.json`` last; ``force``: rebuild).
    True when written."""
    from train_template.shards import exclusive, is_up_to_date, staged_splits

    fingerprint = f"write_shards-{num_train}-{num_val}-{num_test}-{chunk_bytes}"
    with exclusive(out):
        if not force and is_up_to_date(out, fingerprint):
            return False
        with staged_splits(out, {"fingerprint": fingerprint}) as staging:
            write_shards(staging, num_train, num_val, num_test, chunk_bytes)
    return True


def train_cmd(
    subcommand: str,
    run_dir: Path,
    data_dir: Path,
    *args: str,
    config: str | tuple[str, ...] | None = None,
    model_and_data: tuple[str, ...] | list[str] = tuple(MODEL_AND_DATA),
) -> list[str]:
    """``train.py`` on the tests' own module and shards, with ``configs/<config>.yaml``
    (e.g. ``ddp``, or several in order: ``("lm", "fsdp")``) when given; ``args`` may select another ``--model`` / ``--data`` (the
    examples' tests pass ``model_and_data=()`` to train what the configs select)."""
    names = [config] if isinstance(config, str) else list(config or ())
    configs = [
        arg for name in names for arg in ("--config", str(REPO / "configs" / f"{name}.yaml"))
    ]
    return [
        PYTHON,
        str(REPO / "train.py"),
        subcommand,
        *configs,
        *model_and_data,
        "--data.data_dir",
        str(data_dir),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        *args,
    ]


def forget_object_store_clients() -> None:
    """What a process exit does for fsspec: its filesystems are cached per process by
    their arguments, not by the ``AWS_*`` variables they read, so an in-process run with
    another endpoint would get the last one's client."""
    if "s3fs" in sys.modules:
        sys.modules["s3fs"].S3FileSystem.clear_instance_cache()


@pytest.fixture
def cli_in_process(monkeypatch, capsys):
    """Run ``train.py`` in this process (the real CLI, imported once: a row takes about a
    second instead of a new interpreter's start). Returns (exit status, stdout, stderr)."""
    from train_template.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns about pytest's own

    def call(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
        env = env or {}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
        capsys.readouterr()
        # Lightning's log handler holds the stderr of the moment it was imported (an earlier
        # test's capture, closed since): point it at this call's stderr, as in a process.
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        logs = [
            handler
            for logger in loggers
            if isinstance(logger, logging.Logger)
            for handler in logger.handlers
            if type(handler) is logging.StreamHandler  # not pytest's capture handlers
        ]
        streams = [handler.stream for handler in logs]
        for handler in logs:
            handler.stream = sys.stderr  # not setStream: it flushes the closed one
        environ = dict(os.environ)  # Lightning writes MASTER_PORT & co. into it
        status = 0
        try:
            main(args)  # any exception but the CLI's own exit is a traceback: the test fails
        except SystemExit as exited:
            status = exited.code or 0
        finally:
            for handler, stream in zip(logs, streams, strict=True):
                handler.stream = stream
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            os.environ.clear()
            os.environ.update(environ)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()  # it would hold its port for later DDP runs
            forget_object_store_clients()
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return call


def run(cmd: list[str], timeout: float = 300, env: dict | None = None, check: bool = True):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def error_line(stderr: str) -> str:
    """Rank 0's ``error:`` line, else the last ``error (rank N):`` line. Every rank that
    fails prints its own line, in whatever order the processes reach stderr; after them
    gloo's threads may still print "terminate called without an active exception" at
    interpreter exit (the exit status stays 2)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert lines, stderr[-3000:]
    return next((line for line in lines if line.startswith("error:")), lines[-1])


def recorder_config(run_dir: Path) -> Path:
    """A config overlay that adds the sample-id audit callback."""
    return audit_overlay(run_dir.parent / f"{run_dir.name}-audit.yaml", run_dir / "samples")


def audit_overlay(path: Path, out_dir: Path) -> Path:
    """A config overlay at ``path`` whose SampleIdRecorder writes into ``out_dir``."""
    return callback_overlay(path, "train_template.callbacks.SampleIdRecorder", out_dir=out_dir)


def callback_overlay(path: Path, class_path: str, **init_args) -> Path:
    """A config overlay at ``path`` that adds one callback to the trainer's."""
    arguments = ", ".join(f"{name}: {value}" for name, value in init_args.items())
    path.write_text(
        "trainer:\n  callbacks:\n"
        f"    - class_path: {class_path}\n"
        f"      init_args: {{{arguments}}}\n"
    )
    return path


def steps_of(*audits: Path) -> dict[tuple[int, int], tuple[list[int], float]]:
    """(epoch, step) -> (sorted sample ids of all ranks, LR) from SampleIdRecorder folders;
    a later audit (a relaunch) wins a step."""
    steps: dict[tuple[int, int], tuple[list[int], float]] = {}
    for audit in audits:
        found: dict[tuple[int, int], tuple[list[int], float]] = {}
        for path in sorted(audit.glob("samples-rank*.jsonl")):
            for record in map(json.loads, path.read_text().splitlines()):
                key = (record["epoch"], record["step"])
                found.setdefault(key, ([], record["lr"]))[0].extend(record["ids"])
        steps.update({key: (sorted(ids), lr) for key, (ids, lr) in found.items()})
    return steps


def read_samples(run_dir: Path) -> dict[tuple[int, int, int], dict]:
    """(rank, epoch, batch_idx) -> the last record written for it (resumes overwrite)."""
    records = {}
    for path in sorted((run_dir / "samples").glob("samples-rank*.jsonl")):
        rank = int(path.stem.removeprefix("samples-rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[(rank, record["epoch"], record["batch_idx"])] = record
    return records


def load_plan(run_dir: Path) -> dict:
    plans = sorted((run_dir / "logs").glob("version_*/plan.json"))
    assert plans, f"no plan.json under {run_dir}"
    return json.loads(plans[-1].read_text())


def last_step(run_dir: Path) -> int:
    """The global step of ``run_dir``'s last.ckpt (a file or a sharded folder); -1 while
    there is none."""
    from train_template.checkpoint_files import checkpoint_progress

    progress = checkpoint_progress(str(run_dir / "checkpoints" / "last.ckpt"))
    return -1 if progress is None else progress[0]


def kill_after_checkpoint(
    cmd: list[str], run_dir: Path | str, min_step: int, env: dict | None = None, step_of=None
) -> int:
    """Start training, SIGKILL its whole process group once last.ckpt reaches min_step
    (``step_of(run_dir)`` reads its step; a local run folder by default). Returns the step
    a resume starts from: of the newest complete checkpoint on disk after the kill (a save
    may have finished in between; a top-k file may be newer than last.ckpt)."""
    local = step_of is None
    step_of = step_of or last_step
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while step_of(run_dir) < min_step:
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return newest_step(Path(run_dir)) if local else step_of(run_dir)


def newest_step(run_dir: Path) -> int:
    """The global step of the newest complete checkpoint of a local run (any file or
    sharded folder in its checkpoints folder): where ``--ckpt_path last|auto`` resumes."""
    from train_template.checkpoint_files import checkpoint_progress

    folder = run_dir / "checkpoints"  # what the resolver reads: no partial, no damaged one
    paths = [*folder.glob("*.ckpt"), *folder.glob("*.ckpt.replaced")]
    found = [checkpoint_progress(str(p)) for p in paths]
    return max((progress[0] for progress in found if progress), default=-1)


def kill_after_step(cmd: list[str], step: int, env: dict | None = None) -> None:
    """Run ``cmd`` with ``faults.KillAfterCheckpoint(step)``: the run's process group is
    SIGKILLed from inside at the first batch after step ``step`` (its checkpoint saved)."""
    overlay = Path(tempfile.mkdtemp()) / f"kill-after-{step}.yaml"
    callback_overlay(overlay, "faults.KillAfterCheckpoint", step=step)
    result = subprocess.run(
        [*cmd, "--config", str(overlay)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # the group it kills is the run's own
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


# Two gloo processes through Lightning's own launcher (add to a ddp.yaml command).
CPU_DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def assert_same_weights(reference: Path, resumed: Path) -> dict:
    """The two runs' last.ckpt (files or sharded folders): same global step and scheduler
    state, torch.equal weights. Returns the resumed one's metadata."""
    import torch

    from train_template.checkpoint_files import read_checkpoint
    from train_template.export import weights_of

    a, b = (str(run_dir / "checkpoints" / "last.ckpt") for run_dir in (reference, resumed))
    meta_a, meta_b = read_checkpoint(a), read_checkpoint(b)
    assert meta_a["global_step"] == meta_b["global_step"]
    assert meta_a["lr_schedulers"] == meta_b["lr_schedulers"]
    weights_a, weights_b = weights_of(a)[0], weights_of(b)[0]
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name
    return meta_b


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
        "true",  # whole global batches, every sample at most once an epoch
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


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port for a server a test starts: free now, never handed out before in this
    session, and below the kernel's ephemeral range (where bind to port 0 and outgoing
    connections take their ports), so nothing else can take it between this call and the
    server's bind. Port + 10000 (SeaweedFS's implied gRPC port) is free and below it too;
    from 20000 up: Lightning's SLURM environment takes 15000-19999 for its jobs."""
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(20_000, ephemeral - 10_000)
        pair = (port, port + 10_000)
        if not _HANDED_OUT.intersection(pair) and all(map(_bindable, pair)):
            _HANDED_OUT.update(pair)
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def small_filesystem(tmp_path):
    """``mount(name, size)``: a tmpfs of ``size`` (e.g. "1m") mounted at ``tmp_path/name``,
    its own filesystem (root only; the test suite runs as root). Unmounted after the test,
    also when it fails."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True
        )
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(point)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the free space of ``directory``'s filesystem."""
    filler = directory / "filler"
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(0, free - leave))
    return filler
