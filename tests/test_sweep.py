"""``train.py sweep``: an Optuna study whose trials are ordinary runs of the tests' own
docs-style module, each in its own folder; the study loadable with ``optuna.load_study``;
a sweep SIGKILLed mid-trial and relaunched continues that trial from its checkpoint and
ends with exactly ``n_trials``; a trial's user error is a failed trial with its one line;
2-process trials. (An array of SLURM tasks sharing one study: ``tests/test_slurm.py``.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import CPU_DDP, MODEL_AND_DATA, PYTHON, REPO, kill_after_checkpoint, run, write_shards

SPACE = {
    "model.init_args.lr": {"float": [0.01, 0.2], "log": True},
    "data.init_args.batch_size": {"categorical": [8, 16]},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("sweep-shards"), 96, num_val=32)


def sweep_cmd(sweep_dir: Path, data: Path, *extra: str, space: dict = SPACE) -> list[str]:
    overlay = sweep_dir.parent / f"{sweep_dir.name}-space.yaml"
    overlay.write_text(yaml.safe_dump({"sweep": {"space": space, "pruner": "none"}}))
    return [
        PYTHON, str(REPO / "train.py"), "sweep", *MODEL_AND_DATA,
        "--data.data_dir", str(data), "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", "2", "--config", str(overlay),
        "--sweep.dir", str(sweep_dir), "--sweep.metric", "val_loss",
        "--sweep.direction", "minimize", *extra,
    ]  # fmt: skip


def load(sweep_dir: Path):
    import optuna

    from train_template.sweep_trial import open_storage

    storage = open_storage(str(sweep_dir / "study.journal"))
    return optuna.load_study(study_name="sweep", storage=storage)


@pytest.mark.slow  # three trials, each a process (the quick subset keeps the bad sweeps)
def test_a_sweep_runs_its_trials_as_ordinary_runs(tmp_path, shards):
    sweep_dir = tmp_path / "sweep"
    result = run(sweep_cmd(sweep_dir, shards, "--sweep.n_trials", "3"), timeout=600)
    study = load(sweep_dir)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert len({t.params["model.init_args.lr"] for t in trials}) == 3
    for trial in trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir == sweep_dir / f"trial-{trial.number:04d}"
        plan = json.loads(next(run_dir.glob("logs/version_0/plan.json")).read_text())
        assert plan["batch_size"] == trial.params["data.init_args.batch_size"]  # its own plan
        config = yaml.safe_load(next(run_dir.glob("logs/version_0/config.yaml")).read_text())
        assert config["model"]["init_args"]["lr"] == trial.params["model.init_args.lr"]
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        losses = [
            float(r["val_loss"])
            for r in csv.DictReader(next(run_dir.glob("logs/version_0/metrics.csv")).open())
            if r.get("val_loss")
        ]
        assert trial.value == min(losses)  # the best validation of the run
    assert study.best_trial.value == min(t.value for t in trials)
    output = result.stdout + result.stderr
    assert f"rerun it: {PYTHON}" in output and "best-rerun" in output
    assert (sweep_dir / "trials.csv").is_file() and (sweep_dir / "history.png").is_file()


@pytest.mark.slow  # two trial processes
def test_a_trial_with_a_user_error_fails_in_one_line_and_the_sweep_goes_on(tmp_path, shards):
    sweep_dir = tmp_path / "sweep"
    space = {"data.init_args.batch_size": {"categorical": [0]}}  # refused by every trial
    run(sweep_cmd(sweep_dir, shards, "--sweep.n_trials", "2", space=space), timeout=600)
    trials = load(sweep_dir).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert trials[0].user_attrs["error"] == (
        "error: --data.batch_size=0: the batch size must be at least 1"
    )


@pytest.mark.slow  # a sweep killed and relaunched
def test_a_killed_sweep_continues_its_trial_and_ends_with_n_trials(tmp_path, shards):
    sweep_dir = tmp_path / "sweep"
    command = sweep_cmd(
        sweep_dir, shards, "--sweep.n_trials", "2", "--checkpoint.every_n_train_steps", "2"
    )
    first = sweep_dir / "trial-0000"
    killed_at = kill_after_checkpoint(command, first, 2)
    assert 0 < killed_at, "killed after a checkpoint of trial 0"
    params = load(sweep_dir).get_trials()[0].params
    result = run(command, timeout=600)
    output = result.stdout + result.stderr
    assert "sweep: trial 0 continues from its newest checkpoint" in output
    assert f"resumed at global step {killed_at} of" in output
    trials = load(sweep_dir).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[0].params == params


@pytest.mark.ddp
@pytest.mark.slow  # two trials of two processes
def test_trials_of_two_processes(tmp_path, shards):
    sweep_dir = tmp_path / "sweep"
    command = sweep_cmd(
        sweep_dir,
        shards,
        "--sweep.n_trials",
        "2",
        "--config",
        str(REPO / "configs" / "ddp.yaml"),
        *CPU_DDP,
    )
    run(command, timeout=600)
    for trial in load(sweep_dir).get_trials():
        assert trial.state.name == "COMPLETE"
        plan = json.loads(
            next(Path(trial.user_attrs["run_dir"]).glob("logs/version_0/plan.json")).read_text()
        )
        assert plan["world_size"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sweep.n_trials", "0"], "--sweep.n_trials=0: run at least one trial"),
        (
            ["--sweep.space", "{}"],
            "the sweep has no search space: give sweep: space: in a --config",
        ),
        (
            ["--sweep.space", "{model.init_args.lr: {float: [0.1]}}"],
            "--sweep.space model.init_args.lr: {'float': [0.1]} is not one of",
        ),
        (["--sweep.trials", "3"], "unknown option --sweep.trials: the sweep takes"),
        (["--sweep.direction", "down"], "--sweep.direction=down: use minimize or maximize"),
        (["--sweep.metric", "null"], "--sweep.metric: the run has no --checkpoint.monitor"),
        (
            [
                "--checkpoint.monitor",
                "val_loss",
                "--sweep.metric",
                "train_loss",
                "--sweep.direction",
                "null",
            ],
            "--sweep.direction: give minimize or maximize for --sweep.metric=train_loss (the run's",
        ),
    ],
    ids=[
        "no-trials",
        "no-space",
        "bad-range",
        "unknown-option",
        "bad-direction",
        "no-metric",
        "no-direction",
    ],
)
def test_a_bad_sweep_is_one_line(tmp_path, shards, args, message, cli_in_process):
    """docs/errors.md rows 56-62, before any trial starts."""
    command = sweep_cmd(tmp_path / "sweep", shards, *args)  # the later --sweep.* win
    status, _, stderr = cli_in_process(command[2:])
    assert status == 2, stderr[-3000:]
    assert message in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    assert not list((tmp_path / "sweep").glob("trial-*"))


def test_a_trial_worse_than_the_median_is_pruned_at_its_epoch_end(tmp_path, shards):
    """The trial side in a real fit: two finished trials reported val_loss 0.0 after
    epoch 0, so the median pruner stops a third whose val_loss is worse at that epoch: the
    run ends after epoch 0 of 5 with its end-of-epoch checkpoint, the trial records it."""
    import optuna
    from plain_lightning import DocsStyleModule
    from shard_data import ShardData

    from train_template.planned_trainer import PlannedTrainer
    from train_template.seam.optuna import trial_id
    from train_template.steps import template_callbacks
    from train_template.sweep_trial import (
        PRUNED_AT,
        TrialLink,
        TrialReporter,
        make_pruner,
        open_storage,
    )

    journal = str(tmp_path / "study.journal")
    storage = open_storage(journal)
    study = optuna.create_study(study_name="sweep", storage=storage, pruner=make_pruner("median"))
    for _ in range(2):
        finished = study.ask()
        finished.report(0.0, step=0)
        study.tell(finished, 0.0)
    trial = study.ask()
    link = TrialLink(journal, "sweep", trial_id(trial), "val_loss", "median")
    trainer = PlannedTrainer(
        default_root_dir=tmp_path / "run",
        accelerator="cpu",
        max_epochs=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*template_callbacks(), TrialReporter(link)],
    )
    trainer.fit(DocsStyleModule(), ShardData(str(shards), batch_size=16))
    assert trainer.current_epoch == 1 and trainer.global_step == 6  # epoch 0's 6 steps
    done = study.trials[trial.number]
    assert done.user_attrs[PRUNED_AT] == 0 and done.intermediate_values[0] > 0
    assert list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
