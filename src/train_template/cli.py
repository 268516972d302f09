"""The command line: LightningCLI with the template's options, the ``plan`` dry run and errors.

``--model CLASS_PATH`` and ``--data CLASS_PATH`` take any LightningModule and
LightningDataModule (default: the digits example); the machinery below works for
any of them. Options beyond the Trainer's, model's and DataModule's own:

- ``--checkpoint.*``: the ModelCheckpoint used for training. Default: save at the end
  of every training epoch into ``<default_root_dir>/checkpoints`` (the same folder on
  every relaunch), keep ``last.ckpt`` and the best two by ``val/acc``.
- ``--plan.*``: the training plan's own inputs (``max_samples``, ``max_tokens``).
- ``--lr_schedule.*``: the whole LR curve, warmup included (``schedule.LRSchedule``).
- ``--preemption.*``: how often several processes agree on a SIGUSR1/SIGTERM.
- ``--distributed.timeout_s``: the longest a rank waits for a lost peer (``distributed``).

``configs/default.yaml`` is the base of every run (the embedded default); a ``--config``
overlays it, so ``configs/ddp.yaml`` says only what DDP changes.
- ``--ckpt_path last`` resumes from the newest complete checkpoint of the run
  (``last.ckpt`` unless it is missing or damaged) and fails if there is none;
  ``--ckpt_path auto`` does the same and starts fresh when there is none (what a
  requeued job wants).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser

from train_template import launch, storage
from train_template.checkpointing import RunCheckpoint, resolve_ckpt_path
from train_template.distributed import DistributedOptions, lost_peer_line
from train_template.errors import UserError
from train_template.planning import PlannedTrainer, PlanOptions
from train_template.preemption import PreemptionOptions
from train_template.quiet import silence_known_messages
from train_template.schedule import LRSchedule
from train_template.seam import CLISeam, set_collective_timeout
from train_template.steps import template_callbacks

# The embedded example, named (not imported) so that the machinery never depends on it:
# `--model` / `--data` or a config's `model:` / `data:` block replace these.
DEFAULT_MODEL = "examples.digits.module.ClassifierModule"
DEFAULT_DATA = "examples.digits.data.DigitsDataModule"
# The base config every --config overlays (model, data, length, logging, LR curve).
BASE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"

CHECKPOINT_DEFAULTS = {
    "checkpoint.filename": "epoch{epoch:03d}-step{step:06d}",
    "checkpoint.auto_insert_metric_name": False,
    "checkpoint.monitor": "val/acc",
    "checkpoint.mode": "max",
    "checkpoint.save_top_k": 2,
    "checkpoint.save_last": True,
    "checkpoint.save_on_train_epoch_end": True,
    # Relaunches write the same names: a preemption save made before the callback's own
    # first save would otherwise turn the next save into last-v1.ckpt, which no relaunch
    # reads. A fresh fit over an earlier run's checkpoints is refused instead.
    "checkpoint.enable_version_counter": False,
}


class TemplateCLI(CLISeam):
    """LightningCLI for the template: fit, validate, test, predict and plan."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Any LightningModule / LightningDataModule by class path (subclass mode).
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", PlannedTrainer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_class_arguments(PlanOptions, "plan")
        parser.add_class_arguments(LRSchedule, "lr_schedule")
        parser.add_class_arguments(PreemptionOptions, "preemption")
        parser.add_class_arguments(DistributedOptions, "distributed")
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})

    def extra_subcommands(self) -> dict[str, str]:
        return {"plan": "Print the training plan (any world size) without training."}

    def add_extra_subcommand_arguments(self, name: str, parser: LightningArgumentParser) -> None:
        parser.add_argument("--json", type=bool, default=False, help="Print the plan as JSON.")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Plan a resume of this checkpoint (last, auto or a file) at this world size.",
        )
        parser.add_argument(
            "--lr_curve", type=str | None, default=None, help="Save the LR curve to this PNG file."
        )

    def run_extra_subcommand(self, name: str) -> None:
        from train_template.dry_run import run_plan

        run_plan(self.config["plan"], self.datamodule, self.model, self.config_init["plan"])

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        root = trainer.default_root_dir or "runs/default"
        trainer.default_root_dir = root
        if config.checkpoint.dirpath is None:
            # Fixed across relaunches: a new logger version must not hide last.ckpt.
            config.checkpoint.dirpath = storage.join(root, "checkpoints")
        if trainer.accumulate_grad_batches is not None and trainer.accumulate_grad_batches < 1:
            raise UserError(
                f"--trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: must be at least 1"
            )
        if not config.distributed.timeout_s > 0:
            raise UserError(
                f"--distributed.timeout_s={config.distributed.timeout_s}: must be a positive "
                "number of seconds (the longest a rank waits for a peer)"
            )
        if self.subcommand != "plan":  # the dry run writes nothing and starts no processes
            check_writable(root)
            if trainer.logger in (None, True):
                trainer.logger = default_loggers(root)
            trainer.devices, trainer.num_nodes = launch.torchrun_layout(
                trainer.devices, trainer.num_nodes
            )
            launch.check_environment(trainer.devices, trainer.num_nodes)
            launch.check_strategy(trainer.strategy, trainer.accelerator, _cuda_available())
            if launch.in_slurm_job() and not trainer.plugins:
                # The preemption save (steps.RunMachinery) saves and requeues at a step boundary instead of
                # Lightning's save from inside the signal handler.
                trainer.plugins = [
                    {
                        "class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment",
                        "init_args": {"auto_requeue": False},
                    }
                ]
            config.ckpt_path = resolve_ckpt_path(config.get("ckpt_path"), config.checkpoint.dirpath)

    def instantiate_trainer(self, **kwargs: Any):
        # The dry run plans for world sizes this machine may not have: no Trainer.
        if self.subcommand == "plan":
            return None
        init = self.config_init[self.subcommand]
        own = init.trainer.get("callbacks") or []
        # A config's own callbacks first, then the template's (the checkpoint callback
        # from --checkpoint.* is added by LightningCLI and run last by Lightning).
        kwargs["callbacks"] = [
            *(own if isinstance(own, list) else [own]),
            *template_callbacks(
                plan=init.plan,
                lr_schedule=init.lr_schedule,
                preemption=init.preemption,
                predict=self.subcommand == "predict",
            ),
        ]
        trainer = super().instantiate_trainer(**kwargs)
        set_collective_timeout(trainer.strategy, init.distributed.timeout_s)
        return trainer

    def before_fit(self) -> None:
        if self.config["fit"].get("ckpt_path") is None:
            refuse_to_overwrite(self.config["fit"].checkpoint.dirpath)


def default_loggers(root: str) -> list[dict]:
    """CSV (``metrics.csv``) and TensorBoard (``events.out.tfevents.*``) loggers, both
    writing into ``<root>/logs/version_N``: the same keys, one folder per launch."""
    version = next_log_version(root)
    options = {"save_dir": root, "name": "logs", "version": version}
    return [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": options},
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {**options, "default_hp_metric": False},
        },
    ]


def next_log_version(root: str) -> int:
    """The next free ``version_N`` under ``<root>/logs`` (as Lightning's loggers count),
    local or in object storage."""
    names = storage.names_in(storage.join(root, "logs"))
    taken = [int(n.removeprefix("version_")) for n in names if n.removeprefix("version_").isdigit()]
    return max(taken, default=-1) + 1


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_writable(root: str) -> None:
    """Fail before any work when the run directory cannot be created or written (an
    object store: no such bucket, bad credentials, no endpoint)."""
    try:
        storage.check_writable(root)
    except Exception as error:  # noqa: BLE001 - OSError, or the object store's own errors
        reason = (
            getattr(error, "strerror", None) or str(error).splitlines()[0] or type(error).__name__
        )
        where = "choose a directory you can write to"
        if storage.is_url(root):
            where = "check the bucket and the AWS_* settings (AWS_ENDPOINT_URL, keys)"
        raise UserError(
            f"--trainer.default_root_dir={root} is not writable ({reason}): {where}"
        ) from None


def refuse_to_overwrite(checkpoint_dir: str) -> None:
    """A fresh fit must not replace an earlier run's checkpoints of the same names."""
    if storage.files_in(checkpoint_dir, "*.ckpt"):
        raise UserError(
            f"{checkpoint_dir} already holds checkpoints of an earlier run: resume it with "
            "--ckpt_path last (or auto), or start a new run with another --trainer.default_root_dir"
        )


def main(args: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns user errors into one line and exit status 2."""
    silence_known_messages()
    parser_kwargs: dict[str, Any] = {"exit_on_error": False}
    if BASE_CONFIG.is_file():
        for subcommand in ("fit", "validate", "test", "predict", "plan"):
            parser_kwargs[subcommand] = {"default_config_files": [str(BASE_CONFIG)]}
    try:
        TemplateCLI(args=args, parser_kwargs=parser_kwargs)
        end_process_group()
    except SystemExit:
        end_process_group()  # a preemption save: every rank agreed and left at one step
        raise
    except UserError as error:
        _fail(str(error))
    except MisconfigurationException as error:  # Lightning's own "fix your settings" errors
        _fail(" ".join(str(error).split()))
    except ValueError as error:
        # jsonargparse wraps an error raised in a --model/--data class's __init__ in its
        # union explanation; the class's own one-line message is inside.
        if "Does not validate against any of the Union subtypes" not in str(error):
            raise
        _fail(parser_error_line(str(error)))
    except RuntimeError as error:
        lost = lost_peer_line(error) or storage.outage_line(error)
        if lost:
            # The group cannot be closed without the lost peer: leave without waiting.
            _leave(lost)
        # torch's strict load_state_dict lists every key over many lines: name the first.
        if "Error(s) in loading state_dict" not in str(error):
            raise
        first = next(line.strip() for line in str(error).splitlines()[1:] if line.strip())
        _fail(
            f"the checkpoint holds a different model ({first[:200]}): use a checkpoint of "
            "this model, or the --model settings it was trained with"
        )
    except Exception as error:  # jsonargparse reports bad options with its own type
        if type(error).__name__ == "ArgumentError":
            _fail(with_renamed_hint(parser_error_line(str(error))))
        if outage := storage.outage_line(error):
            # Other ranks may wait in a collective for this one: leave without waiting.
            _leave(outage)
        raise


def end_process_group() -> None:
    """Close the process group of a finished run before the interpreter shuts down.

    Lightning leaves it open. Left to interpreter finalization, gloo's worker threads can
    still hold tensors whose release needs the GIL that is being torn down: the process
    aborts ("terminate called without an active exception", exit 134) after a run that
    trained to the end, and SLURM marks the job FAILED. Only on success: after an error
    some ranks may still sit in a collective, and destroying the group would wait on them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def with_renamed_hint(line: str) -> str:
    """Options renamed in this version: an old name is refused with its new name."""
    renamed = "--plan.warmup" in line or ("lr_schedule" in line and "model" in line)
    if renamed and "unrecognized" in line:
        return (
            f"{line}: the whole LR curve is --lr_schedule.* now (warmup_steps, warmup_epochs, "
            "warmup_fraction, decay, final_lr_factor, warmup_start_factor, stable_fraction)"
        )
    return line


_UNION_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "- Expected a <class 'NoneType'>",
)


def parser_error_line(message: str) -> str:
    """jsonargparse's nested, multi-line explanation -> its one relevant line.

    With ``--model``/``--data`` in subclass mode every bad option is wrapped in union
    errors ("Does not validate against any of the Union subtypes ... NoneType"); what
    the user needs is the option's full key and the innermost reason.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_UNION_NOISE)]
    if not useful:
        return " ".join(lines)[:400]
    reason = useful[-1].removeprefix("- ")
    if reason.startswith("--"):  # the template's own one-line error, raised in __init__
        return reason
    keys = [k for line in useful for k in re.findall(r'^Parser key "([^"]+)"', line)]
    before = useful[-2].removeprefix("- ") if len(useful) > 1 else ""
    if before.startswith("Problem with given class_path"):
        reason = f"{before} {reason}"
    line = f'Parser key "{".".join(keys)}": {reason}' if keys else " ".join(useful)
    return line if len(line) < 400 else line[:397] + "..."


def _error_line(message: str) -> str:
    rank = launch.global_rank_from_env()
    return f"{'error' if rank == 0 else f'error (rank {rank})'}: {message}"


def _leave(message: str) -> None:
    """One error line and exit status 1 at once: a fault of the run's surroundings (a
    lost peer, an object store gone), not of its settings; no clean-up that could wait
    on a peer or on the store."""
    sys.stdout.flush()
    print(_error_line(message), file=sys.stderr, flush=True)
    os._exit(1)


def _fail(message: str) -> None:
    print(_error_line(message), file=sys.stderr)
    sys.exit(2)
