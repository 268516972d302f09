"""A resume on another layout in the global sample order (the default): a run killed with SIGKILL
after a mid-epoch checkpoint and relaunched on another number of processes continues with
the same global batch (accumulation re-derived), and every later optimizer step, through
the next epoch, trains on the same set of samples with the same LR as the uninterrupted
run; the step count is the same. For the template's litdata data module and for a plain
map-style ``LightningDataModule`` that never heard of the template (the template's
sampler takes the place of Lightning's ``DistributedSampler``). Real processes: gloo DDP
on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    CPU_DDP,
    REPO,
    audit_overlay,
    kill_after_checkpoint,
    run,
    steps_of,
    train_cmd,
    write_shards,
)
from litdata import StreamingDataset

from train_template.order import GlobalOrder
from train_template.seam.litdata import chunk_sizes

pytestmark = pytest.mark.ddp

BATCH = 8
ON_ANY_LAYOUT = [
    "--data.batch_size", str(BATCH),
    "--trainer.max_epochs", "2",
    "--trainer.precision", "32-true",
    "--checkpoint.every_n_train_steps", "3",
    # windows of 2 blocks: 4 KB chunks of 50 samples (5 chunks), or 50 indices of the map-style data
    "--plan.shuffle_window", "2", "--plan.shuffle_block", "50",
]  # fmt: skip
ONE_RANK = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
# A module and a map-style data module written as Lightning's docs show, that never heard
# of the template (tests/plain_lightning.py): OneCycleLR from estimated_stepping_batches,
# dropout; 403 digits, DataLoader(shuffle=True).
MAP_STYLE = [
    "--model", "plain_lightning.DocsStyleModule",
    "--data", "plain_lightning.MapStyleDataModule", "--data.init_args.batch_size", "8",
]  # fmt: skip
ENV = {"PYTHONPATH": str(REPO / "tests")}


def audited(run_dir: Path, data: Path, audit: Path, *args: str) -> list[str]:
    command = train_cmd("fit", run_dir, data, *ON_ANY_LAYOUT, *args, config="ddp")
    return [*command, "--config", str(audit_overlay(audit.with_suffix(".yaml"), audit))]


# litdata's shards 2 -> 1 also run in tests/test_hosts.py (torchrun's elastic restart on the
# host left); here they are slow (out of the quick subset), the map-style module is not.
@pytest.fixture(
    scope="module", params=[pytest.param("litdata", marks=pytest.mark.slow), "map-style"]
)
def reference(request, tmp_path_factory):
    """The uninterrupted run, on one process (the order is the same on every layout)."""
    root = tmp_path_factory.mktemp("layout-change")
    data = write_shards(root / "data", 203, chunk_bytes="4KB")
    source = [] if request.param == "litdata" else MAP_STYLE
    reference = audited(
        root / "reference", data, root / "reference-audit", *ONE_RANK, *source,
        "--plan.global_batch_size", "16",  # the killed runs' global batch: 2 ranks x 8
    )  # fmt: skip
    run(reference, env=ENV)
    num_samples = 203 if request.param == "litdata" else 403
    blocks = chunk_sizes(StreamingDataset(str(data / "train"))) if not source else 50
    assert blocks == 50 or len(blocks) > 3  # more windows than one
    return data, source, num_samples, blocks, steps_of(root / "reference-audit")


@pytest.mark.parametrize(
    "before,after",
    [
        (CPU_DDP, ONE_RANK),
        pytest.param(
            [*ONE_RANK, "--trainer.accumulate_grad_batches", "2"], CPU_DDP, marks=pytest.mark.slow
        ),
    ],
    ids=["2-to-1", "1-to-2"],
)
def test_a_resume_on_another_world_size_trains_every_step_on_the_same_samples(
    tmp_path, reference, before, after, cli_in_process
):
    data, source, num_samples, blocks, expected = reference
    run_dir = tmp_path / "run"
    killed_at = kill_after_checkpoint(
        audited(run_dir, data, tmp_path / "first", *before, *source), run_dir, 5, env=ENV
    )
    resumed = run(
        audited(run_dir, data, tmp_path / "second", *after, *source, "--ckpt_path", "last"),
        env=ENV,
    )
    output = resumed.stdout + resumed.stderr
    assert "global batch size              16" in output  # kept: accumulation re-derived
    steps = steps_of(tmp_path / "first", tmp_path / "second")
    assert steps.keys() == expected.keys()
    assert min(key for key in steps_of(tmp_path / "second")) <= (0, killed_at)  # mid-epoch
    for key, (ids, lr) in expected.items():
        assert steps[key][0] == ids, key  # the same samples ...
        assert steps[key][1] == pytest.approx(lr, rel=1e-12), key  # ... and the same LR
    # The real loader trains the pure order (2-block windows of the data's chunks, or of
    # 50 indices): step s of epoch e is its window of positions.
    order = GlobalOrder(num_samples, 16, seed=42, shuffle_window=2, block_sizes=blocks)
    for (epoch, step), (ids, _) in expected.items():
        assert ids == sorted(order.step_samples(epoch, step - epoch * order.steps_per_epoch))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * order.steps_per_epoch

    if source:
        return  # the plan command's view of a resume: once is enough
    # The plan a resume on 4 devices of batch 4 would use: the run's global batch of 16.
    status, printed, stderr = cli_in_process(
        [
            *train_cmd("plan", run_dir, data, *ON_ANY_LAYOUT, config="ddp")[2:],
            *["--trainer.devices", "4", "--data.batch_size", "4", "--ckpt_path", "last"],
        ]
    )
    assert status == 0, stderr[-2000:]
    assert f"at global step {2 * order.steps_per_epoch} (epoch 2, step 0)" in printed
    assert "global batch size              16" in printed
    assert "accumulate grad batches        1" in printed
    assert "sample order                   global, shuffled in windows of 2 chunks" in printed


def test_rescaled_batch_counters_keep_lightnings_saved_on_batch_end_mark():
    """A save in on_train_batch_end has completed == processed - 1 (how Lightning knows
    the batch finished); after a 1 -> 2 accumulation change the mark must survive, or a
    save on an epoch's last batch trains one window of that epoch again."""
    from train_template.resume import rescale_batch_counters
    from train_template.seam.checkpoint import batch_progress

    counters = {"ready": 12, "started": 12, "processed": 12, "completed": 11}
    checkpoint = {
        "loops": {
            "fit_loop": {
                "epoch_loop.batch_progress": {"total": dict(counters), "current": dict(counters)}
            }
        }
    }
    progress = batch_progress(checkpoint)
    rescale_batch_counters(progress, saved_accumulation=1, accumulation=2)
    assert progress["current"] == {"ready": 24, "started": 24, "processed": 24, "completed": 23}
    rescale_batch_counters(progress, saved_accumulation=2, accumulation=1)
    assert progress["total"] == counters
