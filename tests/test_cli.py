"""The CLI as a fork uses it, on a module that never heard of the template: every shipped
config overlays any --model/--data, a fit without --config writes its plan, metrics, logs and
picture, the dry-run plan equals the fit plan, errors are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import MODEL_AND_DATA, REPO, load_plan, run, train_cmd, write_shards

SWEEP_CONFIGS = [REPO / "configs" / "sweep.yaml"]  # train.py sweep's, not a run's
CONFIGS = sorted(set((REPO / "configs").glob("*.yaml")) - set(SWEEP_CONFIGS))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("cli-shards"), 403, num_val=64, num_test=64)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses_with_any_model_and_data(config, cli_in_process):
    status, printed, _ = cli_in_process(
        ["fit", "--config", str(config), *MODEL_AND_DATA, "--print_config"]
    )
    assert status == 0
    for block in ("model:", "data:", "checkpoint:", "plan:", "lr_schedule:", "preemption:"):
        assert f"\n{block}" in printed, block
    # Every config overlays the base (configs/base.yaml) and keeps its blocks.
    assert (
        "warmup_fraction:" in printed and "class_path: plain_lightning.DocsStyleModule" in printed
    )
    if config.name == "ddp.yaml":
        assert "strategy: ddp" in printed


def test_the_shipped_sweep_config_is_the_sweeps_alone(tmp_path):
    """configs/sweep.yaml holds only a ``sweep:`` block: the sweep takes it whole (a valid
    search space), and no trial gets it."""
    from train_template.sweep import parse

    options, run_args = parse(["--config", str(SWEEP_CONFIGS[0]), "--sweep.dir", str(tmp_path)])
    assert run_args == [] and options.space and options.n_trials >= 1


HARMLESS = ("LeafSpec", "has `__len__` defined", "litmodels", "LitLogger", "Create an account")


def assert_clean(result) -> None:
    output = result.stdout + result.stderr
    for silenced in HARMLESS:
        assert silenced not in output, f"a known-harmless message is printed: {silenced}"


def test_a_fit_without_config_writes_its_plan_metrics_logs_and_picture(tmp_path, shards):
    """``python train.py fit --model X --data Y`` (no --config): what a fork runs once it
    has deleted the examples."""
    run_dir = tmp_path / "run"
    fitted = run(train_cmd("fit", run_dir, shards, "--trainer.max_epochs", "3"))
    assert_clean(fitted)
    assert "Training plan" in fitted.stdout + fitted.stderr  # the output is not swallowed
    plan = load_plan(run_dir)
    assert plan["max_steps"] == plan["steps_per_epoch"] * 3 == 13 * 3  # 403 samples, batch 32
    # TensorBoard beside the CSV logs, and the picture of the run
    log_dir = sorted((run_dir / "logs").glob("version_*"))[-1]
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "training.png").stat().st_size > 10_000
    metrics = list(csv.DictReader(open(log_dir / "metrics.csv")))
    lrs = {int(row["step"]): float(row["lr-SGD"]) for row in metrics if row.get("lr-SGD")}
    assert sorted(lrs) == list(range(plan["max_steps"]))  # the LR of every optimizer step
    # train_loss on the steps Lightning writes with log_every_n_steps: 10, none lost,
    # and at the last step (the plan stops training there, which Lightning logs too)
    loss_steps = sorted(int(row["step"]) for row in metrics if row.get("train_loss"))
    assert loss_steps == [*range(9, plan["max_steps"], 10), plan["max_steps"] - 1]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert_clean(run(train_cmd("validate", run_dir, shards, "--ckpt_path", "last")))


def test_dry_run_plan_equals_the_plan_of_a_real_fit(tmp_path, shards, cli_in_process):
    """World size 1 here, both through the CLI in this process; world size 2 (drop_last
    true and false) is compared with the real 2-process fit in test_launch.py."""
    args = [
        "--trainer.max_epochs",
        "2",
        "--trainer.accumulate_grad_batches",
        "3",
        "--data.drop_last",
        "true",
        "--trainer.devices",
        "1",
        "--trainer.accelerator",
        "cpu",
        # no process group inside pytest's process: ddp.yaml's strategy on one device
        # would open one (and its port) for the rest of the session
        "--trainer.strategy",
        "auto",
    ]
    status, printed, _ = cli_in_process(
        [
            *train_cmd("plan", tmp_path / "dry", shards, *args, config="ddp")[2:],
            "--json",
            "true",
        ]
    )
    assert status == 0
    dry_plan = json.loads(printed[printed.index("{") :])
    status, _, stderr = cli_in_process(
        train_cmd("fit", tmp_path / "fit", shards, *args, config="ddp")[2:]
    )
    assert status == 0, stderr[-2000:]
    assert load_plan(tmp_path / "fit") == dry_plan


def test_dry_run_for_a_cluster_this_machine_does_not_have(tmp_path, shards):
    png = tmp_path / "lr.png"
    result = run(
        [
            *train_cmd("plan", tmp_path, shards, config="ddp"),
            "--trainer.devices",
            "8",
            "--trainer.num_nodes",
            "4",
            "--data.batch_size",
            "4",
            "--lr_curve",
            str(png),
        ]
    )
    assert "32 (4 node(s) x 8 device(s))" in result.stdout
    assert png.stat().st_size > 1000
    assert_clean(result)


def test_a_user_error_is_one_line_and_exit_status_2_in_a_real_process(tmp_path, shards):
    """The other rows of the error catalogue run in-process (tests/test_errors.py)."""
    result = run(train_cmd("fit", tmp_path, shards, "--ckpt_path", "last"), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --ckpt_path last: there is no")


def test_no_model_and_no_data_is_one_line_that_says_how_to_select_them(tmp_path, cli_in_process):
    """A fork that deleted configs/default.yaml and passed neither --model nor --data."""
    status, _, stderr = cli_in_process(["fit", "--trainer.default_root_dir", str(tmp_path)])
    assert status == 2
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "--model CLASS_PATH and --data CLASS_PATH" in line


def test_export_of_no_checkpoint_is_one_line(tmp_path, cli_in_process):
    """docs/errors.md row 54: a folder without meta.pt, a truncated file, no such path."""
    (tmp_path / "folder.ckpt").mkdir()
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    for path, message in (
        (tmp_path / "folder.ckpt", "not a complete checkpoint"),
        (tmp_path / "truncated.ckpt", "not a complete checkpoint"),
        (tmp_path / "missing.ckpt", "no such checkpoint file or folder"),
    ):
        status, _, stderr = cli_in_process(["export", "--ckpt_path", str(path)])
        assert status == 2, stderr[-2000:]
        line = stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: --ckpt_path {path}: {message}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.ckpt", "truncated.ckpt"]
