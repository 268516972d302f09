"""Sharded training (FSDP2 through Lightning's ``ModelParallelStrategy``, ``configs/fsdp.yaml``)
keeps the template's guarantees for a module that never heard of it
(``plain_lightning.ShardedDocsModule``: ``fully_shard`` in ``configure_model`` as Lightning's
docs show). Real gloo processes; checkpoints are distributed-checkpoint folders, each rank
writing its own shard.

One run is killed with SIGKILL after a mid-epoch checkpoint; two copies of it go on:
- on the same 2 processes (``--ckpt_path auto``): every later step has the samples and
  LR of the uninterrupted run and the final weights are bitwise equal;
- on 1 process (2 -> 1, accumulation 2, weights and optimizer state resharded on load),
  killed again in the next epoch and finished on 2 processes (1 -> 2): the same samples
  and LR at every step, the same number of steps, the weights equal to float tolerance.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    audit_overlay,
    error_line,
    kill_after_checkpoint,
    last_step,
    run,
    steps_of,
    train_cmd,
    write_shards,
)

from train_template.checkpoint_files import newest_complete_checkpoint, resolve_ckpt_path
from train_template.export import weights_of
from train_template.resume import Resume

pytestmark = pytest.mark.ddp

STEPS_PER_EPOCH = 8  # 128 samples / global batch 16
SHARDED = [
    # No dropout: on another world size each sample's mask would come from another
    # rank's generator, and the weights could not be compared (the RNG restore is
    # proven on DDP, tests/test_resume.py, and read from meta.pt, test_folder_checkpoints).
    "--model", "plain_lightning.ShardedDocsModule", "--model.dropout", "0",
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
    "--data.batch_size", "8", "--trainer.max_epochs", "2",
    "--checkpoint.every_n_train_steps", "3",
]  # fmt: skip
TWO = ["--trainer.devices", "2"]
ONE = ["--trainer.devices", "1"]


def sharded(run_dir: Path, data: Path, audit: Path, *args: str) -> list[str]:
    command = train_cmd("fit", run_dir, data, *SHARDED, *args, config="fsdp")
    return [*command, "--config", str(audit_overlay(audit.with_suffix(".yaml"), audit))]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights, step = weights_of(str(run_dir / "checkpoints" / "last.ckpt"))
    assert step == 2 * STEPS_PER_EPOCH
    return weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted 2-process run, and one killed after a mid-epoch checkpoint."""
    root = tmp_path_factory.mktemp("sharded")
    # 20 validation samples: litdata gives rank 0 one batch of 8 and rank 1 two (8 + 4);
    # FSDP2's forward is a collective, so the template pads rank 0's evaluation.
    data = write_shards(root / "data", 128, num_val=20)
    run(sharded(root / "reference", data, root / "reference-audit", *TWO))
    with (root / "reference" / "logs" / "version_0" / "metrics.csv").open() as metrics:
        validated = [row for row in csv.DictReader(metrics) if row.get("val_loss")]
    assert len(validated) == 2  # every epoch validated on both ranks
    killed = root / "killed"
    step = kill_after_checkpoint(sharded(killed, data, root / "killed-audit", *TWO), killed, 3)
    assert 0 < step < 2 * STEPS_PER_EPOCH and step % STEPS_PER_EPOCH != 0  # mid-epoch
    last = killed / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {p.name for p in last.glob("*.distcp")} == {
        "__0_0.distcp",
        "__1_0.distcp",
    }  # each rank wrote its own shard
    return root, data, step


def continued(runs, name: str) -> tuple[Path, Path, Path]:
    """A copy of the killed run (its folder and audit) to go on from."""
    root, data, _ = runs
    run_dir, audit = root / name, root / f"{name}-audit"
    shutil.copytree(root / "killed", run_dir)
    shutil.copytree(root / "killed-audit", audit)
    return run_dir, audit, data


def test_a_sharded_resume_on_the_same_layout_is_bitwise(runs):
    root, _, killed_at = runs
    run_dir, audit, data = continued(runs, "same-layout")
    second = root / "same-layout-second"
    resumed = run(sharded(run_dir, data, second, *TWO, "--ckpt_path", "auto"))
    assert f"resumed at global step {killed_at} of 16" in resumed.stdout + resumed.stderr
    assert steps_of(audit, second) == steps_of(root / "reference-audit")  # samples and LR
    reference, weights = final_weights(root / "reference"), final_weights(run_dir)
    assert reference.keys() == weights.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, weights[name]), name


def test_a_sharded_resume_on_another_world_size_trains_the_same_steps(runs):
    root = runs[0]
    run_dir, audit, data = continued(runs, "layouts")
    on_one = root / "on-one"
    step = kill_after_checkpoint(
        sharded(run_dir, data, on_one, *ONE, "--ckpt_path", "last"), run_dir, STEPS_PER_EPOCH + 1
    )
    assert STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH  # 2 -> 1, then mid-way through epoch 1
    on_two = root / "on-two"
    resumed = run(sharded(run_dir, data, on_two, *TWO, "--ckpt_path", "last"))
    output = resumed.stdout + resumed.stderr
    assert "global batch size              16" in output
    assert f"resumed at global step {step} of 16" in output

    expected = steps_of(root / "reference-audit")
    steps = steps_of(audit, on_one, on_two)
    assert steps.keys() == expected.keys()  # the same number of steps, none twice
    for key, (ids, lr) in expected.items():
        assert steps[key][0] == ids, key  # the same samples ...
        assert steps[key][1] == pytest.approx(lr, rel=1e-12), key  # ... and the same LR
    # Model and optimizer state were resharded, not reset: the weights match the
    # uninterrupted run's up to the summation order of another world size.
    reference, weights = final_weights(root / "reference"), final_weights(run_dir)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5)
    assert last_step(run_dir) == 2 * STEPS_PER_EPOCH


def test_the_folder_is_read_through_its_metadata(runs, cli_in_process):
    """The resume module reads the template's state from the folder's ``meta.pt`` alone:
    the plan, every rank's RNG states and the step, for ``--ckpt_path last|auto`` and the
    plan command (on one process, with no process group)."""
    root, data, killed_at = runs
    last = root / "killed" / "checkpoints" / "last.ckpt"
    assert newest_complete_checkpoint(str(last.parent)) == str(last)
    best = resolve_ckpt_path("best", str(last.parent))  # the newest top-k folder (no monitor)
    assert Path(best).is_dir() and Path(best).name.startswith("epoch")
    resume = Resume.read(str(last))
    assert resume.global_step == killed_at and resume.plan["max_steps"] == 16
    assert resume.plan["world_size"] == 2 and len(resume.rng) == 2  # every rank's RNG

    # The plan a resume on one process would use: the same global batch, accumulation 2.
    args = train_cmd(
        "plan", root / "killed", data, *SHARDED, *ONE, "--ckpt_path", "last", config="fsdp"
    )
    status, printed, stderr = cli_in_process(args[2:])
    assert status == 0, stderr[-2000:]
    assert f"resuming {last} at global step {killed_at}" in printed
    assert "accumulate grad batches        2" in printed


def test_export_consolidates_a_sharded_checkpoint_without_a_process_group(runs, cli_in_process):
    from plain_lightning import ShardedDocsModule
    from safetensors.torch import load_file

    root, _, killed_at = runs
    last = root / "killed" / "checkpoints" / "last.ckpt"
    out = root / "exported" / "weights.safetensors"
    status, printed, stderr = cli_in_process(
        ["export", "--ckpt_path", str(last), "--output", str(out)]
    )
    assert status == 0, stderr[-2000:]
    assert f"(global step {killed_at})" in printed
    assert not torch.distributed.is_initialized()
    exported = load_file(out)
    unsharded = ShardedDocsModule(dropout=0).state_dict()  # the names an inference module loads
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in unsharded.items()}
    weights, _ = weights_of(str(last))
    for name, tensor in weights.items():
        assert torch.equal(exported[name], tensor), name
    ShardedDocsModule(dropout=0).load_state_dict(exported)  # strict: nothing missing or extra


@pytest.mark.slow  # two processes started only to be refused
def test_model_parallel_strategy_defaults_are_refused_in_one_line(runs, tmp_path):
    """Lightning's ModelParallelStrategy defaults make one node a tensor-parallel group: a
    module that shards only over ``data_parallel`` would keep drifting replicas."""
    _, data, _ = runs
    overlay = tmp_path / "model-parallel.yaml"
    overlay.write_text(
        "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
    )
    command = train_cmd("fit", tmp_path / "run", data, *SHARDED, *TWO, "--config", str(overlay))
    result = run(command, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = error_line(result.stderr)
    assert last.startswith("error") and "makes tensor-parallel groups of 2 ranks" in last, last


@pytest.mark.slow  # four processes on this 2-core machine
def test_a_sharded_resume_on_four_processes_trains_the_same_steps(runs):
    """2 -> 4: the model and optimizer shards split again; batch 4 a rank keeps the global
    batch of 16 with no accumulation."""
    root = runs[0]
    run_dir, audit, data = continued(runs, "four")
    on_four = root / "on-four"
    folder = run_dir / "checkpoints" / "last.ckpt"  # --ckpt_path <folder>
    four = ["--trainer.devices", "4", "--data.batch_size", "4", "--ckpt_path", str(folder)]
    resumed = run(sharded(run_dir, data, on_four, *four))
    assert "accumulate grad batches        1" in resumed.stdout + resumed.stderr
    expected = steps_of(root / "reference-audit")
    steps = steps_of(audit, on_four)
    assert steps.keys() == expected.keys()
    for key, (ids, lr) in expected.items():
        assert steps[key][0] == ids, key
        assert steps[key][1] == pytest.approx(lr, rel=1e-12), key
    assert {p.name for p in (run_dir / "checkpoints" / "last.ckpt").glob("*.distcp")} == {
        f"__{rank}_0.distcp" for rank in range(4)
    }
    reference, weights = final_weights(root / "reference"), final_weights(run_dir)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two processes started only to be refused
def test_predict_on_ranks_with_uneven_batches_is_refused_in_one_line(runs, tmp_path):
    """Evaluation pads the shorter ranks (a forward pass is a collective); predictions are
    not padded, since a padded sample would be written twice: one line instead of a hang."""
    root, data, _ = runs
    last = root / "killed" / "checkpoints" / "last.ckpt"
    predict = ["--data.predict_split", "val", "--ckpt_path", str(last)]  # 20 samples: 1 + 2 batches
    command = train_cmd("predict", tmp_path / "run", data, *SHARDED, *TWO, *predict, config="fsdp")
    result = run(command, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = error_line(result.stderr)
    assert "gives the ranks [1, 2] batches" in line and "--trainer.devices 1" in line, line
