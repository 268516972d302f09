"""The template's ModelCheckpoint (``--checkpoint.*``) and its defaults.

Which checkpoint a resume starts from is ``checkpoint_files.py``; what the template adds
to a checkpoint is ``resume.py``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from train_template.seam.checkpoint import ModelCheckpointSeam
from train_template.seam.loop import skip_idle_batch_hooks

# The defaults of --checkpoint.*: save at the end of every training epoch into
# <default_root_dir>/checkpoints (cli.py), keep last.ckpt and the newest epoch's file.
# A config that names a metric the module logs (monitor, mode) keeps the best instead.
CHECKPOINT_DEFAULTS = {
    "checkpoint.filename": "epoch{epoch:03d}-step{step:06d}",
    "checkpoint.auto_insert_metric_name": False,
    "checkpoint.save_top_k": 1,
    "checkpoint.save_last": True,
    "checkpoint.save_on_train_epoch_end": True,
    # Relaunches write the same names: a preemption save made before the callback's own
    # first save would otherwise turn the next save into last-v1.ckpt, which no relaunch
    # reads. A fresh fit over an earlier run's checkpoints is refused instead.
    "checkpoint.enable_version_counter": False,
}


class RunCheckpoint(ModelCheckpointSeam):
    """ModelCheckpoint whose ``last.ckpt`` is always the latest save point.

    Stock ModelCheckpoint refreshes ``last.ckpt`` only when it also saved a top-k
    checkpoint at that step, so with ``monitor``/``save_top_k`` a run whose metric
    stops improving keeps an old ``last.ckpt`` and a resume or requeue replays work.
    It also saves either every N train steps or every N epochs, never both. Here
    ``last.ckpt`` is refreshed at every step trigger and at every epoch end.
    """

    _warned_monitor = False
    _state_key: str | None = None

    @property
    def state_key(self) -> str:
        # Lightning formats every callback's state_key for each hook it calls (the
        # profiler's label), several times a step; ModelCheckpoint builds it from its
        # settings each time. They do not change after __init__.
        if self._state_key is None:
            self._state_key = super().state_key
        return self._state_key

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Its only batch hook decides step- and time-triggered saves; with end-of-epoch
        # saves only (the default) it is not called at all (here, not in __init__: the
        # CLI reads --checkpoint.* from ModelCheckpoint's own signature).
        skip_idle_batch_hooks(self, () if self.saves_within_epochs else ("on_train_batch_end",))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.saves_within_epochs:
            return  # end-of-epoch saves only (the default): nothing to decide per batch
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self.every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0:
            self.save_last_now(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.save_last_now(trainer)

    def keeps_top_k(self, monitor_candidates: dict) -> bool:
        # A monitor this module does not log (a config written for another module) still
        # trains and keeps last.ckpt, with one warning saying what to set.
        if self.monitor is None or self.monitor in monitor_candidates:
            return True
        if not self._warned_monitor:
            self._warned_monitor = True
            logged = [k for k in monitor_candidates if k not in ("epoch", "step")]
            rank_zero_warn(
                f"--checkpoint.monitor={self.monitor} is not logged by this module "
                f"(it logs {logged}): only last.ckpt is kept; set --checkpoint.monitor "
                "(and --checkpoint.mode) to one of those to keep the best checkpoints"
            )
        return False
