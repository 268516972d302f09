"""What Lightning keeps in and around a checkpoint: loop counters, RNG states, and the
private saves of ModelCheckpoint. Pinned: lightning 2.6.6."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


def batch_progress(checkpoint: dict) -> dict:
    """The fit loop's micro-batch counters in a loaded checkpoint (``total`` and
    ``current``, each with ``ready/started/processed/completed``): Lightning's loop-state
    keys (``loops.fit_loop.epoch_loop.batch_progress``), which have no reader outside the
    loops themselves. ``resume.rescale_batch_counters`` changes them in place."""
    return checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]


def checkpoint_progress_of(checkpoint: dict) -> tuple[int, int, int]:
    """(global step, epochs completed, batches completed) from a loaded checkpoint, read
    from the same loop-state keys."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = fit_loop.get("epoch_progress", {}).get("current", {}).get("completed", 0)
    batches = fit_loop.get("epoch_loop.batch_progress", {}).get("total", {}).get("completed", 0)
    return int(checkpoint["global_step"]), int(epochs), int(batches)


def collect_rng_states() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states: Lightning's own collector
    (``lightning.fabric.utilities.seed._collect_rng_states``), which knows every
    generator Lightning seeds; there is no public getter."""
    from lightning.fabric.utilities.seed import _collect_rng_states

    return _collect_rng_states(include_cuda=True)


def set_rng_states(states: dict[str, Any]) -> None:
    """The inverse of :func:`collect_rng_states` (``_set_rng_states``)."""
    from lightning.fabric.utilities.seed import _set_rng_states

    _set_rng_states(states)


class ModelCheckpointSeam(ModelCheckpoint):
    """ModelCheckpoint with public names for the private parts ``RunCheckpoint`` needs.

    ModelCheckpoint offers no hook to refresh ``last.ckpt`` on its own or to decline a
    top-k save; its own methods for both are private (callbacks/model_checkpoint.py).
    """

    @property
    def every_n_train_steps(self) -> int:
        return self._every_n_train_steps

    @property
    def saves_within_epochs(self) -> bool:
        """True when a step or time trigger can save mid-epoch (otherwise its per-batch
        hook has nothing to do)."""
        return self._every_n_train_steps >= 1 or self._train_time_interval is not None

    def save_last_now(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` unless this step was saved already (then it is current)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def keeps_top_k(self, monitor_candidates: dict) -> bool:
        """Override: False skips the top-k save of this moment (``last.ckpt`` is unaffected)."""
        return True

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if self.keeps_top_k(monitor_candidates):
            super()._save_topk_checkpoint(trainer, monitor_candidates)


def dump_checkpoint(trainer: pl.Trainer, weights_only: bool | None) -> dict:
    """The checkpoint dict ``Trainer.save_checkpoint`` would write (every rank builds it):
    ``_CheckpointConnector.dump_checkpoint``, for a save that writes it elsewhere first."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)


def edit_every_checkpoint(trainer: pl.Trainer, edit: Any) -> None:
    """Let ``edit(checkpoint)`` change every checkpoint dict Lightning builds, before any
    strategy writes it.

    ``_CheckpointConnector.dump_checkpoint`` is the one function that builds a checkpoint
    for every save (``Trainer.save_checkpoint``, ModelCheckpoint, a preemption save), with
    ``weights_only`` too; the callbacks' ``on_save_checkpoint`` hook is skipped for
    weights-only saves, which still hold the hyperparameters.
    """
    connector = trainer._checkpoint_connector
    dump = connector.dump_checkpoint

    def dump_and_edit(weights_only: bool | None = None) -> dict:
        checkpoint = dump(weights_only)
        edit(checkpoint)
        return checkpoint

    connector.dump_checkpoint = dump_and_edit
