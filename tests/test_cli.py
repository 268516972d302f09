"""The CLI as a user runs it: shipped configs parse, the embedded default trains to a stated
accuracy, predict writes predictions, the dry-run plan equals the fit plan, errors are one line."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import REPO, load_plan, run, train_cmd

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses_through_the_real_cli(config, cli_in_process):
    status, printed, _ = cli_in_process(["fit", "--config", str(config), "--print_config"])
    assert status == 0
    for block in ("model:", "data:", "checkpoint:", "plan:", "lr_schedule:", "preemption:"):
        assert f"\n{block}" in printed, block
    # Every launch config overlays the base (configs/default.yaml) and keeps its blocks.
    assert "warmup_fraction:" in printed and "class_path: examples." in printed
    if config.name == "ddp.yaml":
        assert "strategy: ddp" in printed and "ClassifierModule" in printed


HARMLESS = ("LeafSpec", "has `__len__` defined", "litmodels", "LitLogger", "Create an account")


def assert_clean(result) -> None:
    output = result.stdout + result.stderr
    for silenced in HARMLESS:
        assert silenced not in output, f"a known-harmless message is printed: {silenced}"


def test_embedded_default_trains_to_95_percent_and_predicts(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    fitted = run(train_cmd("fit", run_dir, digits_dir), timeout=600)
    assert_clean(fitted)
    assert "Training plan" in fitted.stdout + fitted.stderr  # the output is not swallowed
    plan = load_plan(run_dir)
    # TensorBoard beside the CSV logs, and the picture of the run
    log_dir = sorted((run_dir / "logs").glob("version_*"))[-1]
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "training.png").stat().st_size > 10_000
    assert plan["max_steps"] == plan["steps_per_epoch"] * plan["epochs"] == 45 * 15
    metrics = list(
        csv.DictReader(open(sorted((run_dir / "logs").glob("version_*/metrics.csv"))[-1]))
    )
    lrs = {int(row["step"]): float(row["lr-AdamW"]) for row in metrics if row.get("lr-AdamW")}
    assert sorted(lrs) == list(range(plan["max_steps"]))  # the LR of every optimizer step
    assert lrs[0] == pytest.approx(0.003 * 0.01) and lrs[674] == pytest.approx(0.003 * 0.05)
    # train/loss on the steps Lightning writes with log_every_n_steps: 10, none lost,
    # and at the last step (the plan stops training there, which Lightning logs too)
    loss_steps = sorted(int(row["step"]) for row in metrics if row.get("train/loss"))
    assert loss_steps == [*range(9, plan["max_steps"], 10), plan["max_steps"] - 1]

    assert_clean(run(train_cmd("validate", run_dir, digits_dir, "--ckpt_path", "last")))
    tested = run(train_cmd("test", run_dir, digits_dir, "--ckpt_path", "last"))
    assert_clean(tested)
    accuracy = float(
        next(line.split()[-1] for line in tested.stdout.splitlines() if "test/acc" in line)
    )
    assert accuracy >= 0.95

    assert_clean(run(train_cmd("predict", run_dir, digits_dir, "--ckpt_path", "last")))
    rows = list(
        csv.DictReader(open(sorted((run_dir / "logs").glob("version_*/predictions.csv"))[-1]))
    )
    assert len(rows) == 180 and {int(r["prediction"]) for r in rows} <= set(range(10))


def test_dry_run_plan_equals_the_plan_of_a_real_fit(tmp_path, digits_dir, cli_in_process):
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
            *train_cmd("plan", tmp_path / "dry", digits_dir, *args, config="ddp")[2:],
            "--json",
            "true",
        ]
    )
    assert status == 0
    dry_plan = json.loads(printed[printed.index("{") :])
    status, _, stderr = cli_in_process(
        train_cmd("fit", tmp_path / "fit", digits_dir, *args, config="ddp")[2:]
    )
    assert status == 0, stderr[-2000:]
    assert load_plan(tmp_path / "fit") == dry_plan


def test_dry_run_for_a_cluster_this_machine_does_not_have(tmp_path, digits_dir):
    png = tmp_path / "lr.png"
    result = run(
        [
            *train_cmd("plan", tmp_path, digits_dir, config="ddp"),
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


def test_a_user_error_is_one_line_and_exit_status_2_in_a_real_process(tmp_path, digits_dir):
    """The other rows of the error catalogue run in-process (tests/test_errors.py)."""
    result = run(train_cmd("fit", tmp_path, digits_dir, "--ckpt_path", "last"), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --ckpt_path last: there is no")
