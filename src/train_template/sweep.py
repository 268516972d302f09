"""``train.py sweep``: an Optuna study whose trials are ordinary, exact, resumable runs.

    python train.py sweep --config configs/ddp.yaml --config configs/sweep.yaml --sweep.n_trials 20

Every option but ``--sweep.*`` is the run's own, passed to each trial's ``train.py fit``
with the trial's parameters added (``--<dotted option> <value>``), its own run directory
``<dir>/trial-<number>`` and ``--ckpt_path auto``; the search space (``sweep: space:`` in
a config, by option name) and the other settings come from ``--config`` files with a
``sweep:`` block (``configs/sweep.yaml``) and ``--sweep.<name> <value>``. The study lives in
``<dir>/study.journal`` (Optuna's journal file: many processes, one shared filesystem) or
``--sweep.storage URL`` (``sqlite:///...``, ``postgresql://...``).

Each worker (this process; an array task under SLURM: ``--sweep.worker`` defaults to
``SLURM_ARRAY_TASK_ID``) first continues its own trial left running by a kill or a requeue,
from that run's newest checkpoint, then asks the study for new trials while fewer than
``n_trials`` are finished or running (under a file lock in ``<dir>``, so that workers
sharing the study never start one too many). A trial that fails with a user error is
recorded as failed with its one line; the sweep goes on. At the end (and with
``--sweep.report_only true``): the table of trials, Optuna's plots as PNG and the command
that reruns the best trial (``sweep_report.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train_template.errors import UserError
from train_template.seam.optuna import storage_of, trial_id
from train_template.sweep_trial import PRUNED_AT, TRIAL_ENV, TrialLink, make_pruner, open_storage

KINDS = ("float", "int", "categorical")


@dataclass
class SweepOptions:
    """``--sweep.*`` (and a config's ``sweep:`` block)."""

    n_trials: int = 10
    dir: str = "runs/sweep"
    storage: str | None = None  # default: <dir>/study.journal
    study_name: str = "sweep"
    metric: str | None = None  # default: the run's --checkpoint.monitor
    direction: str | None = None  # minimize / maximize; default: from --checkpoint.mode
    seed: int = 0
    pruner: str = "median"  # median / none
    worker: str = field(default_factory=lambda: os.environ.get("SLURM_ARRAY_TASK_ID", "local"))
    launcher: str = ""  # a prefix for each trial's command, e.g. "srun --kill-on-bad-exit=1"
    report_only: bool = False
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def storage_spec(self) -> str:
        return self.storage or str(Path(self.dir) / "study.journal")


def parse(argv: list[str]) -> tuple[SweepOptions, list[str]]:
    """The sweep's options, and the arguments every trial's ``fit`` gets."""
    from_configs: dict[str, Any] = {}  # later configs win, as LightningCLI composes them
    given: dict[str, Any] = {}  # the command line wins over every config
    run_args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--sweep."):
            name, _, value = arg[len("--sweep.") :].partition("=")
            if not value:
                if i + 1 >= len(argv):
                    raise UserError(f"--sweep.{name} needs a value")
                value, i = argv[i + 1], i + 1
            given[name] = yaml.safe_load(value)
        elif arg == "--config" and i + 1 < len(argv):
            run_args += config_for_trials(argv[i + 1], from_configs, given)
            i += 1
        else:
            run_args.append(arg)
        i += 1
    values = {**from_configs, **given}
    known = set(SweepOptions.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown option --sweep.{unknown[0]}: the sweep takes {sorted(known)}")
    options = SweepOptions(**values)
    check(options)
    return options, run_args


def config_for_trials(path: str, values: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """A config's ``sweep:`` block goes to the sweep (into ``values``); the rest, if any,
    to the trials (as a copy without the block, in the sweep's folder)."""
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"--config {path}: {error}") from None
    if not isinstance(content, dict) or "sweep" not in content:
        return ["--config", path]
    values.update(content.pop("sweep") or {})
    if not content:
        return []
    folder = given.get("dir", values.get("dir", SweepOptions.dir))
    rest = Path(folder) / f"config-{Path(path).stem}.yaml"
    rest.parent.mkdir(parents=True, exist_ok=True)
    rest.write_text(yaml.safe_dump(content, sort_keys=False))
    return ["--config", str(rest)]


def check(options: SweepOptions) -> None:
    if options.n_trials < 1:
        raise UserError(f"--sweep.n_trials={options.n_trials}: run at least one trial")
    if options.pruner not in ("median", "none"):
        raise UserError(f"--sweep.pruner={options.pruner}: use median or none")
    if options.direction not in (None, "minimize", "maximize"):
        raise UserError(f"--sweep.direction={options.direction}: use minimize or maximize")
    if not options.space:
        raise UserError(
            "the sweep has no search space: give sweep: space: in a --config (see "
            "configs/sweep.yaml), e.g. model.init_args.lr: {float: [1.0e-4, 1.0e-1], log: true}"
        )
    for name, spec in options.space.items():
        kind = [k for k in KINDS if isinstance(spec, dict) and k in spec]
        ranged = kind[:1] in (["float"], ["int"])
        if len(kind) != 1 or (ranged and len(spec[kind[0]]) != 2) or not spec[kind[0]]:
            raise UserError(
                f"--sweep.space {name}: {spec!r} is not one of {{float: [low, high], log: "
                "true/false}, {int: [low, high]}, {categorical: [a, b, ...]}"
            )


def monitor_of(run_args: list[str]) -> tuple[str | None, str]:
    """The run's ``--checkpoint.monitor`` and mode, from the run's own resolved config
    (``train.py fit ... --print_config``: the real CLI, which also refuses a bad option
    once here instead of in every trial)."""
    command = [sys.executable, str(entry()), "fit", *run_args, "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise UserError(
            f"the run's options: {lines[-1] if lines else 'exit ' + str(result.returncode)}"
        )
    checkpoint = (yaml.safe_load(result.stdout) or {}).get("checkpoint") or {}
    return checkpoint.get("monitor"), checkpoint.get("mode") or "min"


def metric_and_direction(
    metric: str | None, direction: str | None, run_args: list[str]
) -> tuple[str, str]:
    """The metric and direction not given: the run's checkpoint monitor and its mode."""
    monitor, mode = monitor_of(run_args)
    if metric is None and monitor is None:
        raise UserError(
            "--sweep.metric: the run has no --checkpoint.monitor; name the metric the "
            "trials optimize (one the module logs in validation, e.g. val_loss) and "
            "--sweep.direction"
        )
    if direction is None and metric not in (None, monitor):
        raise UserError(
            f"--sweep.direction: give minimize or maximize for --sweep.metric={metric} (the "
            f"run's --checkpoint.monitor is {monitor}, whose mode says nothing about it)"
        )
    return metric or monitor, direction or ("maximize" if mode == "max" else "minimize")


def entry() -> Path:
    """``train.py``: the script of this command (read when asked: a process that imported
    this module for something else, e.g. ``python -m pytest``, has another script), else
    ``train.py`` in the working directory."""
    script = sys.argv[0] if sys.argv else ""
    return Path(script if script.endswith(".py") else "train.py").resolve()


@contextmanager
def ask_lock(folder: Path):
    """One worker at a time asks the study for a trial (and counts what is running)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".ask.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(argv: list[str]) -> None:
    import optuna

    from train_template import sweep_report

    options, run_args = parse(argv)
    folder = Path(options.dir)
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, direction = options.metric, options.direction
    if not options.report_only and (metric is None or direction is None):
        metric, direction = metric_and_direction(metric, direction, run_args)
    storage = open_storage(options.storage_spec)
    with ask_lock(folder):
        study = optuna.create_study(
            study_name=options.study_name,
            storage=storage,
            direction=direction or "minimize",
            sampler=optuna.samplers.TPESampler(seed=options.seed),
            pruner=make_pruner(options.pruner),
            load_if_exists=True,
        )
    finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    print(
        f"sweep: study {options.study_name!r} in {options.storage_spec}, {finished} of "
        f"{options.n_trials} trials finished, {study.direction.name.lower()} {metric}",
        flush=True,
    )
    if not options.report_only:
        while (trial := next_trial(study, options)) is not None:
            run_trial(study, trial, options, run_args, metric)
    sweep_report.report(study, folder)


def next_trial(study, options: SweepOptions):
    """This worker's interrupted trial, else a new one while fewer than n_trials are
    finished or running; None when the sweep is done for this worker."""
    from optuna.trial import TrialState

    with ask_lock(Path(options.dir)):
        trials = study.get_trials(deepcopy=False)
        for frozen in trials:
            if (
                frozen.state == TrialState.RUNNING
                and frozen.user_attrs.get("worker") == options.worker
            ):
                print(
                    f"sweep: trial {frozen.number} continues from its newest checkpoint", flush=True
                )
                return frozen
        if len(trials) - sum(t.state == TrialState.WAITING for t in trials) >= options.n_trials:
            return None
        trial = study.ask()
        for name, spec in options.space.items():
            suggest(trial, name, spec)
        trial.set_user_attr("worker", options.worker)
        return storage_of(study).get_trial(trial_id(trial))


def suggest(trial, name: str, spec: dict[str, Any]) -> Any:
    if "categorical" in spec:
        return trial.suggest_categorical(name, spec["categorical"])
    low, high = spec["float"] if "float" in spec else spec["int"]
    if "float" in spec:
        return trial.suggest_float(
            name, float(low), float(high), log=bool(spec.get("log")), step=spec.get("step")
        )
    return trial.suggest_int(
        name, int(low), int(high), log=bool(spec.get("log")), step=spec.get("step", 1)
    )


def trial_command(
    options: SweepOptions, run_args: list[str], params: dict, run_dir: Path
) -> list[str]:
    """The trial's ``train.py fit``: the run's options, then its parameters, its folder."""
    values = [arg for name, value in params.items() for arg in (f"--{name}", str(value))]
    return [
        *shlex.split(options.launcher), sys.executable, str(entry()), "fit", *run_args, *values,
        "--trainer.default_root_dir", str(run_dir), "--ckpt_path", "auto",
    ]  # fmt: skip


def run_trial(study, frozen, options: SweepOptions, run_args: list[str], metric: str) -> None:
    from optuna.trial import TrialState

    from train_template import redact

    run_dir = Path(options.dir) / f"trial-{frozen.number:04d}"
    command = trial_command(options, run_args, frozen.params, run_dir)
    shown = redact.masked_command(command)
    storage, tid = storage_of(study), trial_id(frozen)
    storage.set_trial_user_attr(tid, "run_dir", str(run_dir))
    storage.set_trial_user_attr(tid, "command", shown)
    print(f"sweep: trial {frozen.number} {frozen.params} -> {run_dir}", flush=True)
    link = TrialLink(options.storage_spec, options.study_name, tid, metric, options.pruner)
    env = {**os.environ, TRIAL_ENV: link.to_env()}
    status, error = run_and_keep_error_line(command, env)
    done = storage.get_trial(tid)
    stopped = status in (0, 128 + signal.SIGTERM) and PRUNED_AT not in done.user_attrs
    if stopped and not trained_to_its_end(run_dir):
        # A preemption (SIGTERM, or SIGUSR1 and a requeue): the trial saved its checkpoint
        # and stays running in the study; this worker's relaunch continues it.
        print(f"sweep: trial {frozen.number} stopped before its end; relaunch to continue it")
        raise SystemExit(status)
    if status == 0 and PRUNED_AT in done.user_attrs:
        study.tell(frozen.number, state=TrialState.PRUNED)
        print(
            f"sweep: trial {frozen.number} pruned after epoch {done.user_attrs[PRUNED_AT]}",
            flush=True,
        )
        return
    values = list(done.intermediate_values.values())
    if status == 0 and values:
        best = max(values) if study.direction.name == "MAXIMIZE" else min(values)
        study.tell(frozen.number, best)
        print(f"sweep: trial {frozen.number} {metric}={best:.6g}", flush=True)
        return
    if status == 0:
        error = f"{metric} was never logged in validation: set --sweep.metric to a metric the module logs"
    storage.set_trial_user_attr(tid, "error", error or f"exit status {status}")
    study.tell(frozen.number, state=TrialState.FAIL)
    print(f"sweep: trial {frozen.number} failed: {error or f'exit status {status}'}", flush=True)


def trained_to_its_end(run_dir: Path) -> bool:
    """The trial's newest checkpoint is at its plan's last step."""
    from train_template.checkpoint_files import checkpoint_progress

    plans = sorted(
        run_dir.glob("logs/version_*/plan.json"),
        key=lambda p: int(p.parent.name.removeprefix("version_")),
    )
    progress = checkpoint_progress(str(run_dir / "checkpoints" / "last.ckpt"))
    if not plans or progress is None:
        return False
    return progress[0] >= json.loads(plans[-1].read_text())["max_steps"]


def run_and_keep_error_line(command: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run a trial, its output passed through as it comes; its exit status and the last
    ``error`` line it printed (a user error's one line). SIGTERM and SIGUSR1 sent to this
    process go on to the trial, which saves at its next step boundary."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    forwarded = {
        signum: signal.signal(signum, lambda received, _: process.send_signal(received))
        for signum in (signal.SIGTERM, signal.SIGUSR1)
    }
    error = None
    try:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            if line.startswith("error"):
                error = line.strip()
        return process.wait(), error
    finally:
        for signum, handler in forwarded.items():
            signal.signal(signum, handler)
