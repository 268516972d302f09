"""Checkpointing: the template's ModelCheckpoint and the RNG state carried in checkpoints.

Writes are already atomic in Lightning: ``TorchCheckpointIO`` serialises to memory and
writes through an fsspec transaction (a temporary file moved into place), so a
process killed mid-write never leaves a partial file under a checkpoint's name
(``tests/test_resume.py`` kills a writer to prove it).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is always the latest save point.

    Stock ModelCheckpoint refreshes ``last.ckpt`` only when it also saved a top-k
    checkpoint at that step, so with ``monitor``/``save_top_k`` a run whose metric
    stops improving keeps an old ``last.ckpt`` and a resume or requeue replays work.
    It also saves either every N train steps or every N epochs, never both. Here
    ``last.ckpt`` is refreshed at every step trigger and at every epoch end.
    """

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step_trigger = (
            self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        )
        if step_trigger:
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        # Skipped when this step was saved already (then last.ckpt is current).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RNGStateCallback(Callback):
    """Saves every rank's torch, CUDA, numpy and Python RNG states so dropout after a
    resume is unchanged.

    Lightning checkpoints do not hold the global RNG states; without them a resumed
    run draws different dropout masks and ends with different weights. Ranks drift
    apart (a short last batch or a padding batch draws a different number of dropout
    values), and only rank 0 writes the checkpoint, so the states are gathered from
    all ranks. They are put back at the first training batch: between
    ``on_train_start`` and that batch Lightning's loops still draw from the global
    generator.
    """

    def __init__(self) -> None:
        self._restored: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank (only rank 0 writes it), so a
        # collective is safe here.
        states = _collect_rng_states(include_cuda=True)  # torch, CUDA, numpy, Python
        # numpy's state holds an ndarray; as tensors and ints, checkpoints still load with
        # weights_only=True.
        states["numpy"] = _numpy_state_to_safe(states["numpy"])
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {"ranks": [states]}
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, states)
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("ranks")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._restored:
            return
        states = self._restored[min(trainer.global_rank, len(self._restored) - 1)]
        _set_rng_states({**states, "numpy": _numpy_state_from_safe(states["numpy"])})
        self._restored = None


def _numpy_state_to_safe(state: tuple) -> dict[str, Any]:
    name, keys, position, has_gauss, cached_gaussian = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_safe(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["position"], state["has_gauss"], state["cached_gaussian"])


class SaveOnPreemption(Callback):
    """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM: save at the next step
    boundary, requeue the SLURM job on SIGUSR1, and exit.

    Lightning's own SLURM handler saves from inside the signal handler, which can land
    in the middle of an optimizer step, and then keeps training. Here the handler only
    records the signal; after the current batch every rank agrees through one
    all-reduce (ranks may get the signal at different moments), all save ``last.ckpt``
    at the same step, and the process leaves. A relaunch with ``--ckpt_path auto``
    continues exactly (the save is a mid-epoch checkpoint like any other).
    """

    def __init__(self) -> None:
        self._received: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self._received = signum

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        received = torch.tensor([self._received or 0])
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
        signum = int(received.item())
        if not signum:
            return
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
