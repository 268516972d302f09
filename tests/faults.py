"""A fault a test injects at an exact point of a real run, at the start of the first
batch after optimizer step ``step``, when the checkpoint saved at that step is complete:
``KillAfterCheckpoint`` SIGKILLs the run's whole process group (every rank, the
launcher); ``PauseAfterCheckpoint`` SIGSTOPs it once, for the test to break something
under it (stop the object store) and SIGCONT it. Where a test cannot watch a run's
checkpoints quickly enough (in object storage, every poll is a download; on 2 busy
cores a resumed run trained from step 8 to its end between two polls), the fault then
lands after a mid-epoch checkpoint on any machine load, instead of whenever the poll
happens to see one."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class _AfterCheckpoint(pl.Callback):
    signal: signal.Signals

    def __init__(self, step: int) -> None:
        self.step = step
        self.fired = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning runs ModelCheckpoint's saves at the end of the batch that completed the
        # step; this hook of the next batch comes after them, on every rank.
        if self.fired or trainer.global_step < self.step or not trainer.is_global_zero:
            return
        if os.getpgrp() == os.getpgid(os.getppid()):  # never the group of who started it
            raise RuntimeError(f"{type(self).__name__} needs a run in its own process group")
        self.fired = True
        os.killpg(os.getpgrp(), self.signal)


class KillAfterCheckpoint(_AfterCheckpoint):
    signal = signal.SIGKILL


class PauseAfterCheckpoint(_AfterCheckpoint):
    signal = signal.SIGSTOP
