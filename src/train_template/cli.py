"""The command line: LightningCLI with the template's options, the ``plan`` dry run and errors.

``--model CLASS_PATH`` and ``--data CLASS_PATH`` take any LightningModule and
LightningDataModule; the machinery names none. Every subcommand starts from
``configs/base.yaml`` (the machinery's defaults: seed, length, logging, throughput, LR
curve), then ``configs/default.yaml`` when it exists (the model and data a plain
``python train.py fit`` trains: the embedded example, or yours; the environment variable
``TRAIN_TEMPLATE_DEFAULT_CONFIG`` names another file, or none when set empty), then each
``--config``.
Options beyond the Trainer's, model's and DataModule's own (``options.py``):

- ``--checkpoint.*``: the ModelCheckpoint used for training (``checkpointing.py``).
  Default: save at the end of every training epoch into ``<default_root_dir>/checkpoints``
  (the same folder on every relaunch), keep ``last.ckpt``.
- ``--plan.*``: the training plan's own inputs (``max_samples``, ``max_tokens``, ...).
- ``--lr_schedule.*``: the whole LR curve, warmup included (``schedule.py``).
- ``--preemption.*``: how often several processes agree on a SIGUSR1/SIGTERM.
- ``--distributed.timeout_s``: the longest a rank waits for a lost peer (``distributed``).
- ``--ckpt_path last`` resumes from the newest complete checkpoint of the run
  (``last.ckpt`` unless it is missing or damaged) and fails if there is none;
  ``--ckpt_path auto`` does the same and starts fresh when there is none (what a
  requeued job wants).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser

from train_template import cli_errors, launch, redact, storage
from train_template.checkpoint_files import resolve_ckpt_path
from train_template.checkpointing import CHECKPOINT_DEFAULTS, RunCheckpoint
from train_template.errors import UserError
from train_template.options import DistributedOptions, LRSchedule, PlanOptions, PreemptionOptions
from train_template.planned_trainer import PlannedTrainer
from train_template.quiet import silence_known_messages
from train_template.run_dir import check_writable, default_loggers, refuse_to_overwrite
from train_template.seam.cli import CLISeam
from train_template.seam.loop import set_collective_timeout
from train_template.steps import template_callbacks

# Loaded before every --config, in this order, for every subcommand: the machinery's
# base, then the project's default model and data (a fork may delete or replace it;
# TRAIN_TEMPLATE_DEFAULT_CONFIG names another file, or none when empty).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE_CONFIG = CONFIGS / "base.yaml"
DEFAULT_CONFIG_VARIABLE = "TRAIN_TEMPLATE_DEFAULT_CONFIG"
SUBCOMMANDS = ("fit", "validate", "test", "predict", "plan")


def default_config_files() -> list[str]:
    """``configs/base.yaml``, then the project's default config where there is one."""
    default = os.environ.get(DEFAULT_CONFIG_VARIABLE, str(CONFIGS / "default.yaml"))
    paths = [BASE_CONFIG, *([Path(default)] if default else [])]
    return [str(path) for path in paths if path.is_file()]


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
        kwargs.setdefault("save_config_callback", redact.config_save_callback())
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_class_arguments(PlanOptions, "plan")
        parser.add_class_arguments(LRSchedule, "lr_schedule")
        parser.add_class_arguments(PreemptionOptions, "preemption")
        parser.add_class_arguments(DistributedOptions, "distributed")

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
        from train_template.plan_command import print_plan

        print_plan(self.config["plan"], self.datamodule, self.model, self.config_init["plan"])

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        # Secrets from config files too (the command line's were found before parsing).
        redact.hide_in_output(redact.secret_values(config.as_dict()))
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
            launch.check_strategy(trainer.strategy)
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


def main(args: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns user errors into one line and exit status 2."""
    silence_known_messages()
    redact.hide_in_output(redact.secrets_in_arguments(sys.argv[1:] if args is None else args))
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:  # no model, data or process group: not a Trainer subcommand
        run_export(argv[1:])
        return
    if argv[:1] == ["sweep"]:  # a study of many fits, each its own process
        run_sweep(argv[1:])
        return
    defaults = default_config_files()
    parser_kwargs: dict[str, Any] = {"exit_on_error": False}
    for subcommand in SUBCOMMANDS:
        parser_kwargs[subcommand] = {"default_config_files": defaults}
    try:
        TemplateCLI(args=args, parser_kwargs=parser_kwargs)
        end_process_group()
    except SystemExit:
        end_process_group()  # a preemption save: every rank agreed and left at one step
        raise
    except Exception as error:
        cli_errors.report(error)  # one line and exit, unless it is a bug
        raise


def run_export(argv: list[str]) -> None:
    from train_template.export import main as export_main

    one_line_errors(export_main, argv)


def run_sweep(argv: list[str]) -> None:
    from train_template.sweep import main as sweep_main

    one_line_errors(sweep_main, argv)


def one_line_errors(command: Any, argv: list[str]) -> None:
    """A subcommand outside LightningCLI, with the CLI's one-line user errors."""
    try:
        command(argv)
    except Exception as error:
        cli_errors.report(error)
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
