"""Checkpoints that are complete or absent, on any filesystem.

Lightning's own save writes a file through an fsspec transaction whose temporary file is
in the system temp directory: where that is another filesystem than the run's (node-local
``/tmp``, a shared checkpoint disk), the final "move" is a copy into the checkpoint's name,
and a kill or a full disk during it leaves a partial file there. A sharded checkpoint (a
``torch.distributed.checkpoint`` folder) is overwritten in place. Here every save, by any
strategy, is written to ``<name>.partial`` beside its destination (the same filesystem),
flushed, and renamed into place by rank 0 only after every rank finished its part:

- a file replaces the old one with one ``os.replace`` (atomic on POSIX);
- a folder replaces the old one in two renames, the old one kept as ``<name>.replaced``
  between them (``checkpoint_files.newest_complete_checkpoint`` reads it if a kill lands
  there) and removed after.

A save that fails with an ``OSError`` on any rank (a full disk, an unwritable directory)
removes its partial files and ends the run on every rank in one line naming the path and
the space needed; the checkpoints already there are untouched. In object storage a file
is written directly: an object store publishes an object only when its upload completed.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from train_template import storage
from train_template.errors import UserError
from train_template.seam.checkpoint import dump_checkpoint

PARTIAL = ".partial"  # a save in progress, or one a kill interrupted (removed at the next)
REPLACED = ".replaced"  # a folder being replaced by a newer one of the same name


def save_checkpoint(trainer: Any, filepath: Any, weights_only: bool | None, options: Any) -> None:
    """``Trainer.save_checkpoint`` (a dump by every rank, the strategy's write, a barrier),
    written under a temporary name and published only when every rank's write succeeded."""
    final = str(filepath)
    strategy = trainer.strategy
    checkpoint = dump_checkpoint(trainer, weights_only)
    if storage.is_url(final) or writes_in_background(strategy):
        # An object store publishes whole objects; a background writer (your
        # AsyncCheckpointIO plugin) is still writing when save_checkpoint returns.
        strategy.save_checkpoint(checkpoint, final, storage_options=options)
        strategy.barrier("Trainer.save_checkpoint")
        return
    partial = final + PARTIAL
    if strategy.is_global_zero:
        remove(partial)  # what a killed save of this name left
    strategy.barrier("atomic_save.partial")
    needed = state_bytes(checkpoint)  # before the strategy pops the shards out of it
    failure: BaseException | None = None
    try:
        strategy.save_checkpoint(checkpoint, partial, storage_options=options)
    except BaseException as error:  # a CheckpointException (DCP) is not an Exception
        if not is_write_failure(error):
            raise
        failure = error
    if strategy.reduce_boolean_decision(failure is not None, all=False):
        if strategy.is_global_zero:
            remove(partial)
        # Rank 0's reason on every rank: with one writer (DDP) only rank 0 knows it.
        raise UserError(strategy.broadcast(save_failed(final, failure, needed)))
    if strategy.is_global_zero:
        publish(partial, final)
    strategy.barrier("Trainer.save_checkpoint")


def writes_in_background(strategy: Any) -> bool:
    """Lightning's ``AsyncCheckpointIO`` returns before the file is written: there is no
    moment to rename it at, so such a plugin keeps its own (non-atomic) writes."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    return isinstance(strategy.checkpoint_io, AsyncCheckpointIO)


def publish(partial: str, final: str) -> None:
    """Flush ``partial`` to disk and rename it to ``final`` (see the module docstring)."""
    sync_tree(partial)
    if os.path.isdir(final) or os.path.isdir(partial):
        replaced = final + REPLACED
        remove(replaced)
        if os.path.lexists(final):
            os.rename(final, replaced)
        os.rename(partial, final)
        remove(replaced)
    else:
        os.replace(partial, final)
    sync_directory(os.path.dirname(final) or ".")


def sync_tree(path: str) -> None:
    """fsync a file, or every file of a folder and the folder itself."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            sync_tree(os.path.join(path, name))
        sync_directory(path)
        return
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def sync_directory(path: str) -> None:
    """fsync a directory, so a rename in it survives a crash of the machine."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a checkpoint dict (a sharded tensor counts its local shard)."""
    import torch

    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def os_error_of(error: BaseException | None) -> OSError | None:
    """The OSError behind a failed save: the error itself, one it was raised while handling
    (torch.save's writer turns a full disk into a RuntimeError), or one that a
    ``torch.distributed.checkpoint.CheckpointException`` collected from any rank."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        for failure in getattr(error, "failures", {}).values():
            found = os_error_of(failure[0] if isinstance(failure, tuple) else failure)
            if found is not None:
                return found
        error = error.__context__
    return None


def is_write_failure(error: BaseException) -> bool:
    """An OSError (also behind torch.save's RuntimeError), or a failed write of any rank of
    a torch.distributed.checkpoint save (its ``CheckpointException``: the ranks' errors are
    pickled to the coordinator, which loses what they were raised while handling)."""
    return os_error_of(error) is not None or bool(getattr(error, "failures", None))


def save_failed(final: str, failure: BaseException | None, needed: int) -> str:
    """The one line of a failed save: the path, the reason, the space it needs and has."""
    directory = os.path.dirname(final) or "."
    try:
        free: int | None = shutil.disk_usage(directory).free
    except OSError:
        free = None
    error = os_error_of(failure)
    if error is not None:
        reason = error.strerror or str(error)
    elif free is not None and free < needed:
        reason = "No space left on device"  # a rank's full disk, as DCP reports it
    elif failure is not None and getattr(failure, "failures", None):
        first = next(iter(failure.failures.values()))
        first = first[0] if isinstance(first, tuple) else first
        reason = f"{type(first).__name__}: {(str(first).splitlines() or [''])[0][:200]}"
    else:  # this rank wrote nothing; another rank's write failed
        return f"cannot save checkpoint {final}: another rank's write failed (see its error)"
    space = "" if free is None else f", {storage.size_text(free)} free there"
    return (
        f"cannot save checkpoint {final}: {reason} (it needs about "
        f"{storage.size_text(needed)} per rank{space}): free space in {directory} or point "
        "--trainer.default_root_dir at a larger, writable disk; the checkpoints already "
        "there are kept"
    )


class DirectCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing a local file directly where it is asked
    to (``<name>.partial``, made atomic by :func:`save_checkpoint`) and fsyncing it, with
    no temporary file in the system temp directory, which may be small or another disk."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage.is_url(str(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        import torch

        os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
        with open(path, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
