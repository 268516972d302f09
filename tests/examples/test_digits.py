"""The digits example, the embedded default: the shipped configs select it, and a plain
``fit`` trains it to a stated accuracy, then validate, test and predict run clean."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from conftest import REPO, load_plan, run, train_cmd
from test_cli import assert_clean

from examples.digits.prepare import prepare


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded digits, prepared by the real preparation code (in-process writer)."""
    out = tmp_path_factory.mktemp("digits")
    prepare("digits", out, num_workers=0, log=lambda *_: None)
    return out


def digits_cmd(subcommand: str, run_dir: Path, data: Path, *args: str) -> list[str]:
    return train_cmd(subcommand, run_dir, data, *args, config="default", model_and_data=())


@pytest.mark.parametrize("config", ["default.yaml", "ddp.yaml", "lm.yaml"])
def test_the_shipped_configs_select_the_examples(config, cli_in_process):
    status, printed, _ = cli_in_process(
        ["fit", "--config", str(REPO / "configs" / config), "--print_config"]
    )
    assert status == 0
    expected = "LanguageModule" if config == "lm.yaml" else "ClassifierModule"
    assert "class_path: examples." in printed and expected in printed


def test_embedded_default_trains_to_95_percent_and_predicts(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    fitted = run(digits_cmd("fit", run_dir, digits_dir), timeout=600)
    assert_clean(fitted)
    plan = load_plan(run_dir)
    assert plan["max_steps"] == plan["steps_per_epoch"] * plan["epochs"] == 45 * 15
    metrics = list(
        csv.DictReader(open(sorted((run_dir / "logs").glob("version_*/metrics.csv"))[-1]))
    )
    lrs = {int(row["step"]): float(row["lr-AdamW"]) for row in metrics if row.get("lr-AdamW")}
    assert sorted(lrs) == list(range(plan["max_steps"]))  # the LR of every optimizer step
    # The template's LR curve (planned_optimization): warmup from 1%, cosine to 5%.
    assert lrs[0] == pytest.approx(0.003 * 0.01) and lrs[674] == pytest.approx(0.003 * 0.05)
    loss_steps = sorted(int(row["step"]) for row in metrics if row.get("train/loss"))
    assert loss_steps == [*range(9, plan["max_steps"], 10), plan["max_steps"] - 1]
    # The example's checkpoint monitor (configs/default.yaml): the best two by val/acc.
    assert len(list((run_dir / "checkpoints").glob("epoch*.ckpt"))) == 2

    assert_clean(run(digits_cmd("validate", run_dir, digits_dir, "--ckpt_path", "last")))
    tested = run(digits_cmd("test", run_dir, digits_dir, "--ckpt_path", "last"))
    assert_clean(tested)
    accuracy = float(
        next(line.split()[-1] for line in tested.stdout.splitlines() if "test/acc" in line)
    )
    assert accuracy >= 0.95

    assert_clean(run(digits_cmd("predict", run_dir, digits_dir, "--ckpt_path", "last")))
    rows = list(
        csv.DictReader(open(sorted((run_dir / "logs").glob("version_*/predictions.csv"))[-1]))
    )
    assert len(rows) == 180 and {int(r["prediction"]) for r in rows} <= set(range(10))


def test_prepare_data_with_a_bad_source(tmp_path):
    result = run(
        [
            sys.executable,
            str(REPO / "scripts" / "prepare_data.py"),
            "--source",
            "nope.npz",
            "--out",
            str(tmp_path / "out"),
        ],
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --source 'nope.npz' is neither 'digits' nor an existing .npz file: "
        "pass 'digits' or the path of an .npz with 'images' and 'labels'"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # three trial processes
def test_a_sweep_of_the_digits_with_the_shipped_sweep_config(tmp_path, digits_dir):
    """``train.py sweep --config configs/default.yaml --config configs/sweep.yaml``: the
    shipped search space (the optimizer's LR, the batch size) over the example, the metric
    and direction from its checkpoint monitor (val/acc, max)."""
    import optuna

    from train_template.sweep_trial import open_storage

    sweep_dir = tmp_path / "sweep"
    command = digits_cmd("sweep", tmp_path / "unused", digits_dir, "--trainer.max_epochs", "2")
    command = [
        arg
        for arg in command
        if arg not in ("--trainer.default_root_dir", str(tmp_path / "unused"))
    ]
    command += ["--config", str(REPO / "configs" / "sweep.yaml"), "--sweep.n_trials", "3"]
    command += ["--sweep.dir", str(sweep_dir)]
    result = run(command, timeout=900)
    assert "maximize val/acc" in result.stdout
    storage = open_storage(str(sweep_dir / "study.journal"))
    study = optuna.load_study(study_name="sweep", storage=storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert len({t.params["model.init_args.optimizer.init_args.lr"] for t in trials}) == 3
    for trial in trials:
        assert 0.5 < trial.value <= 1.0  # val/acc after 2 epochs
        assert (Path(trial.user_attrs["run_dir"]) / "checkpoints" / "last.ckpt").is_file()
    assert study.best_trial.value == max(t.value for t in trials)
