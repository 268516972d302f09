"""Streamed data without a length: the length in steps or samples is exact for any module,
epochs alone are refused in one line, a stream that runs dry stops the run in one line,
and a mid-stream checkpoint resumes a stateful loader exactly (a plain one from the
stream's start).

Real fits of Lightning's docs-style module (its OneCycleLR sized from
``estimated_stepping_batches``) on an ``IterableDataset`` with no ``__len__``: in this
process, and through ``train.py`` killed and resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import PYTHON, REPO, assert_same_weights, kill_after_checkpoint, recorder_config, run
from plain_lightning import DocsStyleModule, StreamDataModule

from train_template.errors import UserError
from train_template.options import PlanOptions
from train_template.planned_trainer import PlannedTrainer
from train_template.steps import template_callbacks


def fit(tmp_path, data, *, max_steps=-1, max_epochs=None, accumulate=1, plan=None):
    lrs = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    trainer = PlannedTrainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*template_callbacks(plan or PlanOptions()), Record()],
    )
    torch.manual_seed(0)
    trainer.fit(DocsStyleModule(), data)
    return trainer, lrs


@pytest.mark.parametrize("accumulate", [1, 3])
def test_an_endless_stream_trains_exactly_max_steps_and_the_lr_ends_on_the_last(
    tmp_path, accumulate, caplog
):
    with caplog.at_level("INFO"):
        trainer, lrs = fit(tmp_path, StreamDataModule(), max_steps=20, accumulate=accumulate)
    plan = trainer.training_plan
    # the table says what is unknown, and that OneCycleLR, not the plan, sets the warmup
    assert "epochs                         unknown (a stream without a length)" in caplog.text
    assert "warmup steps                   set by the module's scheduler" in caplog.text
    assert plan.epochs is None and plan.batches_per_epoch is None
    assert trainer.global_step == plan.max_steps == 20 == len(lrs)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 20  # OneCycleLR sized by estimated_stepping_batches
    # OneCycleLR's last step is its minimum: the schedule ended exactly on the last step
    assert lrs[-1] == min(lrs) and lrs[-1] < lrs[0]


def test_a_sample_budget_on_a_stream_rounds_up_to_whole_steps(tmp_path):
    # 200 samples, batch 16, accumulate 2: ceil(200 / 16) = 13 batches, ceil(13 / 2) = 7 steps
    trainer, lrs = fit(
        tmp_path, StreamDataModule(), accumulate=2, plan=PlanOptions(max_samples=200)
    )
    assert trainer.training_plan.length_from == "max_samples"
    assert trainer.global_step == trainer.training_plan.max_steps == 7 == len(lrs)


def test_epochs_alone_on_a_stream_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="the train loader has no length .* --trainer.max_steps"):
        fit(tmp_path, StreamDataModule(), max_epochs=3)


def test_a_stream_that_runs_dry_before_the_length_stops_in_one_line(tmp_path):
    # 100 samples in batches of 16: 7 batches, 7 steps of the planned 50
    with pytest.raises(UserError, match="ran dry after 7 of the planned 50 optimizer steps"):
        fit(tmp_path, StreamDataModule(num_samples=100), max_steps=50)


def test_the_cli_refuses_epochs_alone_on_a_stream(cli_in_process, tmp_path):
    status, _, stderr = cli_in_process(
        [
            "fit",
            "--data",
            "plain_lightning.StreamDataModule",
            "--model",
            "plain_lightning.DocsStyleModule",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_epochs",
            "2",
        ]
    )
    assert status == 2
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith("error: --trainer.max_epochs=2: the train loader has no length (a stream)")
    )


def stream_fit(run_dir: Path, data: str, *extra: str) -> list[str]:
    """``train.py fit`` of the docs-style module on a stream, 30 steps, a checkpoint every
    10, with the sample-id audit."""
    return [
        PYTHON, str(REPO / "train.py"), "fit", "--config", str(recorder_config(run_dir)),
        "--model", "plain_lightning.DocsStyleModule", "--data", data,
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "30", "--checkpoint.every_n_train_steps", "10", *extra,
    ]  # fmt: skip


def stream_steps(run_dir: Path) -> dict[int, tuple[list[int], float]]:
    """step -> (sample ids, LR); a relaunch's record of a step replaces the killed run's."""
    lines = (run_dir / "samples" / "samples-rank0.jsonl").read_text().splitlines()
    return {r["step"]: (r["ids"], r["lr"]) for r in map(json.loads, lines)}


@pytest.mark.slow
def test_a_mid_stream_checkpoint_resumes_the_stream_where_the_loader_can_say(tmp_path):
    """torchdata's ``StatefulDataLoader``: SIGKILL after a mid-stream checkpoint, resumed
    with ``--ckpt_path last``, trains every later step on the uninterrupted run's samples
    and LR, to bitwise equal weights. A plain ``DataLoader`` over the same stream has no
    position to save: the steps after the resume see the stream from its first sample,
    with the same LR and step count."""
    stateful = "plain_lightning.StatefulStreamDataModule"
    reference = tmp_path / "reference"
    run(stream_fit(reference, stateful))
    expected = stream_steps(reference)
    assert sorted(expected) == list(range(30))
    for name, data in ((stateful, stateful), ("plain", "plain_lightning.StreamDataModule")):
        run_dir = tmp_path / name.rsplit(".", 1)[-1]
        killed_at = kill_after_checkpoint(stream_fit(run_dir, data), run_dir, 10)
        assert killed_at in (10, 20), "the kill should land after a mid-stream checkpoint"
        run(stream_fit(run_dir, data, "--ckpt_path", "last"))
        steps = stream_steps(run_dir)
        assert sorted(steps) == list(range(30))
        assert [lr for _, lr in steps.values()] == [lr for _, lr in expected.values()]
        if data == stateful:
            assert steps == expected
            assert_same_weights(reference, run_dir)
        else:  # the stream began again at the resume
            assert steps[killed_at][0] == expected[0][0] != expected[killed_at][0]
