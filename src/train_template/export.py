"""``python train.py export --ckpt_path X``: any checkpoint of a run, a file or a sharded
folder, local or in object storage, to one consolidated weights file for inference
(safetensors), on one process with no process group and no model code.

A sharded checkpoint (``torch.distributed.checkpoint`` folder) is read with DCP's own
reader in "no distributed" mode, model weights only (the optimizer state, most of the
bytes, is never read). Keys are the module's parameter names, with ``torch.compile``'s
``_orig_mod.`` removed, so the file loads into the uncompiled module.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

from train_template import storage
from train_template.errors import UserError

COMPILED = "_orig_mod."  # what torch.compile inserts into a compiled module's keys


def weights_of(checkpoint_path: str) -> tuple[dict[str, Any], int]:
    """The model weights (name -> tensor) and the global step of a checkpoint."""
    from train_template.checkpoint_files import read_checkpoint

    try:  # read once: a file whole (memory-mapped), a sharded folder's meta.pt
        metadata = read_checkpoint(checkpoint_path)
        int(metadata["global_step"])
    except Exception:  # noqa: BLE001 - any failure to load means "not a checkpoint"
        raise UserError(
            f"--ckpt_path {checkpoint_path}: not a complete checkpoint (a file, or a sharded "
            "checkpoint folder with its meta.pt): export another one"
        ) from None
    if "state_dict" in metadata:
        weights = metadata["state_dict"]
    else:  # a sharded checkpoint: the weights are in the shards beside meta.pt
        weights = sharded_weights(checkpoint_path)
    return weights, int(metadata["global_step"])


def sharded_weights(folder: str) -> dict[str, Any]:
    """The ``state_dict`` entry of a DCP folder, consolidated in this process."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    reader = None
    if storage.is_url(folder):
        from torch.distributed.checkpoint import FsspecReader

        reader = FsspecReader(folder)
    with warnings.catch_warnings():  # "no process group: loading in one process", the intent
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(
            {"state_dict"}, checkpoint_id=None if reader else folder, storage_reader=reader
        )
    return loaded["state_dict"]


def clean_names(weights: dict[str, Any]) -> dict[str, Any]:
    """Contiguous tensors (safetensors' requirement; tied weights become copies) under the
    uncompiled module's names."""
    return {
        name.replace(COMPILED, ""): tensor.contiguous().clone() for name, tensor in weights.items()
    }


def export(checkpoint_path: str, output: str | None = None) -> str:
    """Write ``output`` (default: the checkpoint's name with ``.safetensors``) and return it."""
    from safetensors.torch import save

    weights, step = weights_of(checkpoint_path)
    target = output or default_output(checkpoint_path)
    data = save(
        clean_names(weights), metadata={"global_step": str(step), "source": checkpoint_path}
    )
    if storage.is_url(target):
        storage.write_bytes(target, data)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        partial = f"{target}.partial"
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, target)
    print(f"exported {len(weights)} tensors of {checkpoint_path} (global step {step}) to {target}")
    return target


def default_output(checkpoint_path: str) -> str:
    stem = checkpoint_path.rstrip("/")
    stem = stem[: -len(".ckpt")] if stem.endswith(".ckpt") else stem
    return stem + ".safetensors"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="train.py export",
        description="A checkpoint (file or sharded folder) to one safetensors weights file.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint file or folder")
    parser.add_argument(
        "--output", default=None, help="the .safetensors file (default: beside the checkpoint)"
    )
    args = parser.parse_args(argv)
    if not storage.exists(args.ckpt_path):
        raise UserError(f"--ckpt_path {args.ckpt_path}: no such checkpoint file or folder")
    export(args.ckpt_path, args.output)
