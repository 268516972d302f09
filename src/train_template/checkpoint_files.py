"""Which checkpoint a resume starts from (``--ckpt_path last|auto|best|<file>``), and
reading one: the newest complete checkpoint of a run, damaged files set aside.

Every save is complete or absent (``atomic_save.py``): a checkpoint's name only ever
holds a complete checkpoint, so what is damaged here was damaged on disk or copied in.
"""

from __future__ import annotations

import io
import os
import posixpath
import zipfile
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from train_template import launch, storage
from train_template.atomic_save import REPLACED
from train_template.errors import UserError
from train_template.seam.checkpoint import checkpoint_progress_of

# The state key of the checkpoint callback (checkpointing.RunCheckpoint), under which
# Lightning keeps its best_model_path.
CHECKPOINT_CALLBACK = "RunCheckpoint"
# Lightning's file of a distributed checkpoint folder that holds all but the shards
# (lightning.fabric.utilities.load._METADATA_FILENAME, lightning 2.6.6).
DISTRIBUTED_METADATA = "meta.pt"


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
    # A folder checkpoint a kill caught between the two renames that replace it
    # (atomic_save.publish) is complete under its ".replaced" name.
    replaced = [] if storage.is_url(directory) else storage.files_in(directory, f"*.ckpt{REPLACED}")
    for path in [*storage.files_in(directory, "*.ckpt"), *replaced]:
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
    memory-mapped, not read; a checkpoint in object storage is read once, into memory.

    A distributed checkpoint (a folder: per-rank ``torch.distributed.checkpoint`` shards
    of weights and optimizer state, and rank 0's ``meta.pt`` with everything else, as
    Lightning's ``ModelParallelStrategy`` writes it) is read through its ``meta.pt``: the
    loop progress and the template's state are there, and no rank's shards are read."""
    import torch

    if storage.is_url(path):
        try:
            data = storage.read_bytes(path)
        except (FileNotFoundError, IsADirectoryError):  # a sharded folder (a prefix)
            path = storage.join(path, DISTRIBUTED_METADATA)
            data = storage.read_bytes(path)
        source: Any = io.BytesIO(data)
        options = {}
    else:
        if os.path.isdir(path):
            path = os.path.join(path, DISTRIBUTED_METADATA)
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
        return checkpoint_progress_of(read_checkpoint(path))
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
        if key.startswith(CHECKPOINT_CALLBACK) and isinstance(state, dict)
    ]
    best = next((p for p in paths if p and storage.exists(p)), None)
    if best is None:
        raise UserError(
            f"--ckpt_path best: {newest} records no existing best checkpoint: use --ckpt_path last"
        )
    return best
