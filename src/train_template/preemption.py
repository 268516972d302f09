"""Preemption: SIGUSR1 (SLURM's warning) or SIGTERM saves at an optimizer-step boundary,
requeues the SLURM job on SIGUSR1, and leaves.

Lightning's own SLURM handler saves from inside the signal handler, which can land in the
middle of an optimizer step or an accumulation window (the gradients accumulated so far
are not in a checkpoint, so a resume would not be exact). Here the handler only records
the signal. The save happens at the end of a batch that closed an accumulation window
(its optimizer step is done, no gradient is pending), so the resumed run is bitwise
identical to an uninterrupted one.

Ranks may get the signal at different moments and must all save at the same step. A
single process decides at every window boundary for free. Several processes agree
through one all-reduce (``strategy.reduce`` of a one-element tensor on the root device,
as NCCL requires), but only every ``check_every_n_steps`` optimizer steps, so the
template adds no collective and no host sync to the other steps. With SLURM's
``--signal=USR1@90`` that leaves 90 s for at most ``check_every_n_steps`` steps plus the
save: lower it for slow steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from train_template.errors import UserError
from train_template.options import PreemptionOptions


def closes_accumulation_window(trainer: pl.Trainer, batch_idx: int) -> bool:
    """True after the batch whose optimizer step ended an accumulation window."""
    accumulate = trainer.accumulate_grad_batches
    return (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == trainer.num_training_batches


class PreemptionSave:
    """Part of ``steps.RunMachinery``: records signals, saves ``last.ckpt`` and exits."""

    def __init__(self, options: PreemptionOptions) -> None:
        if options.check_every_n_steps < 1:
            raise UserError(
                f"--preemption.check_every_n_steps={options.check_every_n_steps}: must be at least 1"
            )
        self.check_every_n_steps = options.check_every_n_steps
        self._received: int | None = None
        self._alone = False  # one process: nothing to agree on

    def install(self, world_size: int) -> None:
        self._alone = world_size == 1
        if threading.current_thread() is not threading.main_thread():
            # Python lets only the main thread set signal handlers (Lightning skips its own
            # there too): a fit started from another thread still runs, without this save.
            rank_zero_warn(
                "the fit runs outside the main thread: SIGUSR1/SIGTERM are not caught, "
                "so a preemption does not save last.ckpt (start the fit in the main thread)"
            )
            return
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self._received = self._received or signum

    def after_batch(self, trainer: pl.Trainer, batch_idx: int) -> None:
        if self._alone and not self._received:
            return  # a single process decides alone: nothing received, nothing to do
        if not closes_accumulation_window(trainer, batch_idx):
            return  # gradients of this window are pending: never save here
        signum = self._agreed_signal(trainer)
        if signum:
            self._save_and_exit(trainer, signum)

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        if trainer.world_size == 1:
            return self._received or 0
        if trainer.global_step % self.check_every_n_steps:
            return 0  # not a decision step: every rank skips it alike (same global_step)
        # The largest signal number any rank received (0: none), so that every rank
        # saves at this step and exits the same way. On the root device: NCCL needs it.
        local = torch.tensor([self._received or 0], device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(local, reduce_op="max").item())

    def _save_and_exit(self, trainer: pl.Trainer, signum: int) -> None:
        checkpoint = trainer.checkpoint_callback
        directory = Path(
            checkpoint.dirpath if checkpoint and checkpoint.dirpath else trainer.default_root_dir
        )
        path = directory / "last.ckpt"
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        rank_zero_info(
            f"{name}: saved {path} at step {trainer.global_step}; resume with --ckpt_path auto"
        )
        job_id = os.environ.get("SLURM_JOB_ID")
        if signum == signal.SIGUSR1 and job_id and trainer.is_global_zero:
            array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
            if array_job:
                job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.call(["scontrol", "requeue", job_id])
            rank_zero_info(f"scontrol requeue {job_id}: exit status {result}")
        raise SystemExit(0 if signum == signal.SIGUSR1 else 128 + signum)
