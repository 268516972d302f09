"""A sharded run's checkpoint is a folder (torch.distributed.checkpoint shards per rank and
rank 0's ``meta.pt``, as Lightning's ``ModelParallelStrategy`` writes it); the resume
module reads the template's state from its ``meta.pt`` alone: the plan, every rank's RNG
states and the step, for ``--ckpt_path last|auto`` and the plan command. Two real gloo
processes train a docs-style module that FSDP2 shards in ``configure_model``."""

from __future__ import annotations

import pytest
from conftest import run, train_cmd, write_shards

from train_template.checkpoint_files import newest_complete_checkpoint
from train_template.resume import Resume

# slow: the default run stays under 10 minutes; it is issue 28's ground (the sharded resume).
pytestmark = [pytest.mark.ddp, pytest.mark.slow]

FSDP2 = [
    "--model", "plain_lightning.ShardedDocsModule",
    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
    "--trainer.max_epochs", "2", "--data.batch_size", "8",
]  # fmt: skip


def test_a_folder_checkpoint_is_read_through_its_metadata(tmp_path, cli_in_process):
    data = write_shards(tmp_path / "data", 128)
    overlay = tmp_path / "model-parallel.yaml"
    overlay.write_text(
        "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
    )
    run_dir = tmp_path / "run"
    run(train_cmd("fit", run_dir, data, "--config", str(overlay), *FSDP2))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file()
    assert {p.name for p in last.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    assert newest_complete_checkpoint(str(run_dir / "checkpoints")) == str(last)
    resume = Resume.read(str(last))
    assert resume.global_step == resume.plan["max_steps"] == 16  # 128 / (2 x 8) x 2 epochs
    assert resume.plan["world_size"] == 2 and len(resume.rng) == 2  # every rank's RNG

    # The plan a resume on one process would use: the same global batch, accumulation 2.
    args = train_cmd("plan", run_dir, data, *FSDP2, "--trainer.devices", "1", "--ckpt_path", "last")
    args = args[2:]
    status, printed, stderr = cli_in_process(args)
    assert status == 0, stderr[-2000:]
    assert f"resuming {last} at global step 16 (epoch 2, step 0)" in printed
    assert "accumulate grad batches        2" in printed
