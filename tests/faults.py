"""A fault a test injects at an exact point of a real run: ``KillAfterCheckpoint``
SIGKILLs the run's whole process group (every rank, the launcher) at the start of the
first batch after optimizer step ``step``, when the checkpoint saved at that step is
complete. Where a test cannot watch a run's checkpoints quickly enough (in object
storage, every poll is a download), the kill then lands after a mid-epoch checkpoint on
any machine load, instead of whenever the poll happens to see one."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAfterCheckpoint(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning runs ModelCheckpoint's saves at the end of the batch that completed the
        # step; this hook of the next batch comes after them, on every rank.
        if trainer.global_step >= self.step and trainer.is_global_zero:
            if os.getpgrp() == os.getpgid(os.getppid()):  # never the group of who started it
                raise RuntimeError("KillAfterCheckpoint needs a run in its own process group")
            os.killpg(os.getpgrp(), signal.SIGKILL)
