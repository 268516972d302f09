"""Checkpointing: the template's ModelCheckpoint, every rank's RNG state in checkpoints,
and which checkpoint a resume (``--ckpt_path last|auto|best|<file>``) starts from.

Writes are already atomic in Lightning: ``TorchCheckpointIO`` serialises to memory and
writes through an fsspec transaction (a temporary file moved into place), so a
process killed mid-write never leaves a partial file under a checkpoint's name
(``tests/test_resume.py`` kills a writer to prove it).
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from train_template import launch, seam, storage
from train_template.errors import UserError
from train_template.seam import ModelCheckpointSeam


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
        # The default monitor (val/acc) is the example's metric; a module that does not
        # log it still trains and keeps last.ckpt, with one warning saying what to set.
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


# -- every rank's RNG states in the checkpoint --------------------------------------
# Lightning checkpoints do not hold the global RNG states; without them a resumed run
# draws different dropout masks and ends with different weights. Ranks drift apart (a
# short last batch or a padding batch draws a different number of dropout values), and
# only rank 0 writes the checkpoint, so the states are gathered from all ranks.


def gathered_rng_states() -> list[dict[str, Any]]:
    """Every rank's torch, CUDA, numpy and Python RNG states, in rank order.

    Lightning builds the checkpoint on every rank (only rank 0 writes it), so the
    collective is safe where this is called (``state_dict``)."""
    states = seam.collect_rng_states()
    # numpy's state holds an ndarray; as tensors and ints, checkpoints still load with
    # weights_only=True.
    states["numpy"] = _numpy_state_to_safe(states["numpy"])
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def restore_rng_states(ranks: list[dict[str, Any]], rank: int) -> None:
    """Put back this rank's saved states (the last saved rank's on a larger world)."""
    states = ranks[min(rank, len(ranks) - 1)]
    seam.set_rng_states({**states, "numpy": _numpy_state_from_safe(states["numpy"])})


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


# -- which checkpoint a resume starts from ------------------------------------------


def resolve_ckpt_path(
    ckpt_path: str | None, checkpoint_dir: str, announce=rank_zero_info
) -> str | None:
    """'last' and 'auto': the newest complete checkpoint of the run (by training progress,
    not file time); 'auto' starts fresh (None) only when the run has no checkpoint at
    all. 'best': the best checkpoint that checkpoint records. Paths must be loadable.
    ``checkpoint_dir`` and the files may be local or in object storage (``storage.py``)."""
    if ckpt_path is None:
        return None
    directory = str(checkpoint_dir)
    if ckpt_path in ("last", "auto"):
        newest = newest_complete_checkpoint(directory, announce)
        if newest is None and ckpt_path == "last":
            raise UserError(
                f"--ckpt_path last: there is no checkpoint in {directory}: check "
                "--trainer.default_root_dir, or use --ckpt_path auto to start fresh when "
                "nothing was saved yet"
            )
        return newest
    if ckpt_path == "best":
        return best_checkpoint(directory, announce)
    if ckpt_path in ("hpc", "registry"):
        return ckpt_path
    if not storage.exists(ckpt_path):
        raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    if checkpoint_progress(ckpt_path) is None:
        raise UserError(
            f"checkpoint {ckpt_path} is truncated or corrupt: resume from an earlier "
            f"checkpoint in {posixpath.dirname(ckpt_path)} with --ckpt_path <file>"
        )
    return ckpt_path


def newest_complete_checkpoint(directory: str, announce=rank_zero_info) -> str | None:
    """The checkpoint of ``directory`` furthest into training that loads.

    A process killed between writing a top-k file and ``last.ckpt``, or a ``last.ckpt``
    damaged on disk, must not dead-end a requeued job when a complete checkpoint is
    right there. Damaged files are reported and set aside, never deleted; a fresh start
    over them is refused, so nothing is ever overwritten.
    """
    complete, damaged = [], []
    for path in storage.files_in(directory, "*.ckpt"):
        progress = checkpoint_progress(path)
        if progress is None:
            damaged.append(storage.name_of(path))
        else:
            # Ties (the same step saved twice) go to last.ckpt, the file a relaunch expects.
            complete.append((progress, storage.name_of(path) == "last.ckpt", path))
    if not complete:
        if damaged:
            raise UserError(
                f"{directory} holds only damaged checkpoints ({', '.join(damaged)}): move them "
                "away to start fresh, or resume from a copy with --ckpt_path <file>"
            )
        return None
    progress, _, newest = max(complete)
    if storage.name_of(newest) != "last.ckpt":
        last = storage.join(directory, "last.ckpt")
        if "last.ckpt" in damaged:
            why = f"damaged (kept as {storage.name_of(set_aside(last))})"
        else:
            why = "older" if storage.exists(last) else "missing"
        announce(
            f"resuming from {storage.name_of(newest)} (global step {progress[0]}), the newest "
            f"complete checkpoint in {directory}: last.ckpt is {why}"
        )
    return newest


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint out of the way of the next save (never delete it).

    Only global rank 0 renames; other ranks resolving at the same moment find the
    file damaged, renamed or gone, and pick the same complete checkpoint either way."""
    target = f"{path}.damaged"
    index = 1
    while storage.exists(target):
        target = f"{path}.damaged.{index}"
        index += 1
    if launch.global_rank_from_env() == 0 and storage.exists(path):
        storage.move(path, target)
    return target


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint's contents for reading (raises on a damaged file). Local tensors are
    memory-mapped, not read; a checkpoint in object storage is read once, into memory."""
    import torch

    if storage.is_url(path):
        source: Any = io.BytesIO(storage.read_bytes(path))
        options = {}
    else:
        source, options = str(path), {"mmap": True}
    with zipfile.ZipFile(source) as archive:  # a truncated file has no complete directory
        if not any(name.endswith("data.pkl") for name in archive.namelist()):
            raise ValueError(f"{path} is not a torch checkpoint")
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return torch.load(source, weights_only=True, map_location="cpu", **options)


def checkpoint_progress(path: str) -> tuple[int, int, int] | None:
    """(global step, epochs completed, batches completed) of a loadable checkpoint;
    None when the file is truncated or damaged."""
    try:
        return seam.checkpoint_progress_of(read_checkpoint(path))
    except Exception:  # noqa: BLE001 - any failure to load means "not resumable"
        return None


def best_checkpoint(directory: str, announce=rank_zero_info) -> str:
    """The best checkpoint recorded by the checkpoint callback in the newest checkpoint."""
    newest = newest_complete_checkpoint(directory, announce)
    if newest is None:
        raise UserError(
            f"--ckpt_path best: there is no checkpoint in {directory} to read the best from"
        )
    callbacks = read_checkpoint(newest).get("callbacks", {})
    paths = [
        state.get("best_model_path")
        for key, state in callbacks.items()
        if key.startswith(RunCheckpoint.__name__) and isinstance(state, dict)
    ]
    best = next((p for p in paths if p and storage.exists(p)), None)
    if best is None:
        raise UserError(
            f"--ckpt_path best: {newest} records no existing best checkpoint: use --ckpt_path last"
        )
    return best
