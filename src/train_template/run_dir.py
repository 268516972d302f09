"""The run directory (``--trainer.default_root_dir``): its loggers, and the checks made
before any work (writable; no earlier run's checkpoints overwritten). Local or object
storage (``storage.py``)."""

from __future__ import annotations

from train_template import storage
from train_template.errors import UserError


def default_loggers(root: str) -> list[dict]:
    """CSV (``metrics.csv``) and TensorBoard (``events.out.tfevents.*``) loggers, both
    writing into ``<root>/logs/version_N``: the same keys, one folder per launch."""
    version = next_log_version(root)
    options = {"save_dir": root, "name": "logs", "version": version}
    return [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": options},
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {**options, "default_hp_metric": False},
        },
    ]


def next_log_version(root: str) -> int:
    """The next free ``version_N`` under ``<root>/logs`` (as Lightning's loggers count),
    local or in object storage."""
    names = storage.names_in(storage.join(root, "logs"))
    taken = [int(n.removeprefix("version_")) for n in names if n.removeprefix("version_").isdigit()]
    return max(taken, default=-1) + 1


def check_writable(root: str) -> None:
    """Fail before any work when the run directory cannot be created or written (an
    object store: no such bucket, bad credentials, no endpoint)."""
    try:
        storage.check_writable(root)
    except Exception as error:  # noqa: BLE001 - OSError, or the object store's own errors
        reason = (
            getattr(error, "strerror", None) or str(error).splitlines()[0] or type(error).__name__
        )
        where = "choose a directory you can write to"
        if storage.is_url(root):
            where = "check the bucket and the AWS_* settings (AWS_ENDPOINT_URL, keys)"
        raise UserError(
            f"--trainer.default_root_dir={root} is not writable ({reason}): {where}"
        ) from None


def refuse_to_overwrite(checkpoint_dir: str) -> None:
    """A fresh fit must not replace an earlier run's checkpoints of the same names."""
    if storage.files_in(checkpoint_dir, "*.ckpt"):
        raise UserError(
            f"{checkpoint_dir} already holds checkpoints of an earlier run: resume it with "
            "--ckpt_path last (or auto), or start a new run with another --trainer.default_root_dir"
        )
