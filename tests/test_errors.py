"""The bad-input and fault catalogue (docs/errors.md): every row through the real CLI.

Each case asserts the exit status, the one-line message (no traceback: only the CLI's
own exit may leave it) and that the files of an earlier run (checkpoints, config, logs)
are byte-for-byte unchanged. The rows run the CLI in this process, one import for all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run, train_cmd, write_shards

from train_template.export import weights_of


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An earlier, finished run on tiny shards, plus the odd inputs the cases need."""
    root = tmp_path_factory.mktemp("errors")
    data = write_shards(root / "data", 96)
    earlier = root / "earlier"
    run(train_cmd("fit", earlier, data, "--trainer.max_epochs", "1", "--data.batch_size", "16"))
    bad = {
        "no_shards": root / "empty-dir",
        "small": write_shards(root / "small", 5),
        "corrupt_shard": root / "corrupt-shard",
        "corrupt_index": root / "corrupt-index",
        "truncated_ckpt": root / "truncated.ckpt",
        "bad_yaml": root / "bad.yaml",
        "not_a_dir": root / "a-file",
    }
    bad["no_shards"].mkdir()
    for name in ("corrupt_shard", "corrupt_index"):
        shutil.copytree(data, bad[name])
    chunk = next((bad["corrupt_shard"] / "train").glob("*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:100])
    (bad["corrupt_index"] / "train" / "index.json").write_text("{not json")
    last = (earlier / "checkpoints" / "last.ckpt").read_bytes()
    bad["truncated_ckpt"].write_bytes(last[: len(last) // 2])
    bad["bad_yaml"].write_text("data:\n  batch_sise: 8\n")
    bad["not_a_dir"].write_text("")
    return {"data": data, "earlier": earlier, **bad}


def digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


RESUME = ["--ckpt_path", "last", "--trainer.max_epochs", "1", "--data.batch_size", "16"]
SLURM = {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "x"}

# (id, root: "earlier" or "fresh", data key, extra args, env, expected message)
CASES = [
    (
        "unknown-option",
        "earlier",
        "data",
        ["--trainer.no_such 1"],
        {},
        "unrecognized arguments: --trainer.no_such",
    ),
    ("unknown-config-key", "earlier", "data", ["--config {bad_yaml}"], {}, "batch_sise"),
    (
        "wrong-type",
        "earlier",
        "data",
        ["--data.batch_size abc"],
        {},
        "Parser key \"data.batch_size\": Expected a <class 'int'>",
    ),
    (
        "unknown-class",
        "earlier",
        "data",
        ["--model no.such.Module"],
        {},
        "no.such.Module",
    ),
    (
        "batch-size-zero",
        "earlier",
        "data",
        ["--data.batch_size 0"],
        {},
        "--data.batch_size=0: the batch size must be at least 1",
    ),
    (
        "batch-size-negative",
        "earlier",
        "data",
        ["--data.batch_size -4"],
        {},
        "--data.batch_size=-4",
    ),
    (
        "accumulate-zero",
        "earlier",
        "data",
        ["--trainer.accumulate_grad_batches 0"],
        {},
        "--trainer.accumulate_grad_batches=0: must be at least 1",
    ),
    (
        "data-dir-missing",
        "fresh",
        "nowhere",
        [],
        {},
        "does not exist: build the litdata shards, or point --data.data_dir at them",
    ),
    (
        "data-dir-without-shards",
        "fresh",
        "no_shards",
        [],
        {},
        "holds no litdata shards for 'train'",
    ),
    (
        "fewer-samples-than-a-batch",
        "fresh",
        "small",
        ["--data.batch_size 8 --data.drop_last true"],
        {},
        "fewer than one global batch of 8",
    ),
    ("corrupt-shard", "fresh", "corrupt_shard", [], {}, "is corrupt (100 bytes, expected"),
    ("corrupt-index", "fresh", "corrupt_index", [], {}, "index.json is unreadable"),
    (
        "truncated-checkpoint",
        "earlier",
        "data",
        ["--ckpt_path {truncated_ckpt}"],
        {},
        "is truncated or corrupt",
    ),
    (
        "checkpoint-of-another-model",
        "earlier",
        "data",
        [*RESUME, "--model.hidden 16"],
        {},
        "the checkpoint holds a different model",
    ),
    (
        "ckpt-last-without-checkpoint",
        "fresh",
        "data",
        ["--ckpt_path last"],
        {},
        "--ckpt_path last: there is no",
    ),
    (
        "resume-changed-seed",
        "earlier",
        "data",
        [*RESUME, "--data.seed 7"],
        {},
        "--data.seed 42 -> 7",
    ),
    (
        "resume-changed-shuffle",
        "earlier",
        "data",
        [*RESUME, "--data.shuffle false"],
        {},
        "--data.shuffle true -> false",
    ),
    (
        "resume-changed-order",
        "earlier",
        "data",
        [*RESUME, "--data.global_order false"],
        {},
        "--data.global_order true -> false",
    ),
    (
        "resume-changed-shuffle-window",
        "earlier",
        "data",
        [*RESUME, "--plan.shuffle_window 8"],
        {},
        "(--plan.shuffle_window 64 -> 8)",
    ),
    (
        "bad-shuffle-window",
        "fresh",
        "data",
        ["--plan.shuffle_window 0"],
        {},
        "--plan.shuffle_window=0: must be at least 1 (or null: one permutation of all samples)",
    ),
    (
        "resume-changed-batch-size",
        "earlier",
        "data",
        ["--ckpt_path last --trainer.max_epochs 1 --data.batch_size 12"],
        {},
        "resuming this run's global batch of 16 (checkpoint) at world size 1",
    ),
    (
        "resume-changed-length",
        "earlier",
        "data",
        ["--ckpt_path last --trainer.max_epochs 3 --data.batch_size 16"],
        {},
        "the checkpoint was trained with another plan (max_steps 6 -> 18",
    ),
    (
        "fresh-fit-over-earlier-run",
        "earlier",
        "data",
        [],
        {},
        "already holds checkpoints of an earlier run",
    ),
    (
        "slurm-tasks-not-devices",
        "earlier",
        "data",
        [],
        SLURM,
        "SLURM started 2 tasks but --trainer.devices x --trainer.num_nodes = 1 x 1 = 1",
    ),
    (
        "warmup-longer-than-training",
        "fresh",
        "data",
        ["--trainer.max_epochs 1 --lr_schedule.warmup_steps 50"],
        {},
        "warmup (50 steps) is not shorter than training (3 steps)",
    ),
    (
        "conflicting-lengths",
        "fresh",
        "data",
        ["--trainer.max_steps 5 --plan.max_samples 100"],
        {},
        "keep only one training length",
    ),
    ("output-not-writable", "not_a_dir", "data", [], {}, "is not writable"),
    (
        "max-steps-zero",
        "fresh",
        "data",
        ["--trainer.max_steps 0 --trainer.max_epochs -1"],
        {},
        "--trainer.max_steps=0 trains nothing",
    ),
    (
        "renamed-warmup-option",
        "fresh",
        "data",
        ["--plan.warmup_fraction 0.1"],
        {},
        "--plan.warmup_fraction 0.1: the whole LR curve is --lr_schedule.* now",
    ),
    (
        "renamed-order-option",
        "fresh",
        "data",
        ["--data.elastic false"],
        {},
        "--data.elastic is --data.global_order now",
    ),
    (
        "global-batch-not-divisible",
        "fresh",
        "data",
        ["--plan.global_batch_size 48 --data.batch_size 32"],
        {},
        "--plan.global_batch_size=48 is not a whole number of world size x batch per device",
    ),
    (
        "fsdp1",
        "fresh",
        "data",
        ["--trainer.strategy fsdp"],
        {},
        "--trainer.strategy fsdp is FSDP1, which the template does not checkpoint or resume",
    ),
    (
        "max-epochs-zero",
        "fresh",
        "data",
        ["--trainer.max_epochs 0"],
        {},
        "--trainer.max_epochs=0 trains nothing",
    ),
    (
        "timeout-not-positive",
        "fresh",
        "data",
        ["--distributed.timeout_s 0"],
        {},
        "--distributed.timeout_s=0.0: must be a positive number of seconds",
    ),
    (
        "torchrun-nodes-not-num-nodes",
        "fresh",
        "data",
        ["--trainer.devices auto --trainer.num_nodes 3"],
        {
            "TORCHELASTIC_RUN_ID": "x",
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "1",
            "GROUP_WORLD_SIZE": "2",
        },  # fmt: skip
        "torchrun started 2 node(s) but --trainer.num_nodes=3: leave --trainer.num_nodes out",
    ),
    (
        "root-in-unreachable-object-storage",
        "fresh",
        "data",
        ["--trainer.default_root_dir s3://bucket/run"],
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens there
            "AWS_ACCESS_KEY_ID": "key",
            "AWS_SECRET_ACCESS_KEY": "secret",
            "AWS_MAX_ATTEMPTS": "1",
        },
        "--trainer.default_root_dir=s3://bucket/run is not writable (Could not connect",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_catalogue_row(tmp_path, world, case, cli_in_process):
    _, root, data_key, extra, env, message = case
    run_dir = {
        "earlier": world["earlier"],
        "fresh": tmp_path / "fresh",
        "not_a_dir": world["not_a_dir"] / "run",
    }[root]
    data = world.get(data_key, tmp_path / "nowhere")
    args = " ".join(extra).format(**{k: v for k, v in world.items()}).split()
    before = digest(world["earlier"])
    status, _, stderr = cli_in_process(train_cmd("fit", run_dir, data, *args)[2:], env)
    assert status == 2, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    after = digest(world["earlier"])  # a failed run may add its own log folder, never touch ours
    assert {name: after.get(name) for name in before} == before


def test_a_loader_unlike_the_plan_and_an_unlogged_monitor(tmp_path, world, cli_in_process):
    """Rows 37 and 38: the checks at train start and in the checkpoint callback."""
    growing = ["--data", "plain_lightning.GrowingDataModule", "--trainer.max_epochs", "1"]
    status, _, stderr = cli_in_process(
        train_cmd("fit", tmp_path / "grow", world["data"], *growing)[2:]
    )
    assert status == 2, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert "batches per epoch but the plan measured" in last_line and "Traceback" not in stderr
    assert not (tmp_path / "grow" / "checkpoints").exists() or not any(
        (tmp_path / "grow" / "checkpoints").iterdir()
    )

    run_dir = tmp_path / "monitor"
    args = [
        "--trainer.max_epochs",
        "2",
        "--data.batch_size",
        "16",
        "--checkpoint.monitor",
        "val/acc",
    ]
    with pytest.warns(
        UserWarning, match="--checkpoint.monitor=val/acc is not logged by this module"
    ):
        status, _, stderr = cli_in_process(train_cmd("fit", run_dir, world["data"], *args)[2:])
    assert status == 0, stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize(
    "layout",
    [
        "one-process",
        pytest.param("fsdp2", marks=[pytest.mark.ddp, pytest.mark.slow]),  # each rank its shard
    ],
)
def test_nan_loss_stops_and_keeps_only_finite_checkpoints(tmp_path, world, layout):
    run_dir = tmp_path / "nan"
    sharded = layout == "fsdp2"
    args = [
        "--model.lr",
        "1e30",
        "--checkpoint.every_n_train_steps",
        "1",
        "--data.batch_size",
        "16",
    ]
    if sharded:
        args += ["--model", "plain_lightning.ShardedDocsModule", "--trainer.accelerator", "cpu"]
        args += [
            "--trainer.devices",
            "2",
            "--trainer.precision",
            "32-true",
            "--data.batch_size",
            "8",
        ]
    command = train_cmd("fit", run_dir, world["data"], *args, config="fsdp" if sharded else None)
    result = run(command, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite" in line
    assert "the last good checkpoint is kept" in line
    kept = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert kept, "a good checkpoint (step 1's weights are huge but finite) should be kept"
    for path in kept:
        weights, _ = weights_of(str(path))
        assert all(torch.isfinite(t).all() for t in weights.values()), path.name
    assert not list((run_dir / "checkpoints").glob("*.partial"))


@pytest.mark.slow  # three processes; the accumulation-window SIGTERM: test_recovery
def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path, world):
    run_dir = tmp_path / "term"
    args = ["--trainer.max_epochs", "30", "--data.batch_size", "16"]
    proc = subprocess.Popen(
        train_cmd("fit", run_dir, world["data"], *args),
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists():  # the end of epoch 1: training is under way
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "SIGTERM: saved" in output and "Traceback" not in output
    step = torch.load(last, weights_only=True)["global_step"]
    assert 6 <= step < 180
    resumed = run(train_cmd("fit", run_dir, world["data"], *args, "--ckpt_path", "last"))
    assert "max_steps=180" in resumed.stdout + resumed.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 180
    os.remove(last)


@pytest.mark.slow
def test_ckpt_best_without_a_recorded_best(tmp_path, world):
    run_dir = tmp_path / "no-val"
    run(
        train_cmd(
            "fit",
            run_dir,
            world["data"],
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--checkpoint.monitor",  # never logged without validation: no best recorded
            "val_loss",
        )
    )
    result = run(train_cmd("test", run_dir, world["data"], "--ckpt_path", "best"), check=False)
    assert result.returncode == 2
    assert (
        "records no existing best checkpoint: use --ckpt_path last"
        in result.stderr.strip().splitlines()[-1]
    )
