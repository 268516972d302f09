"""Sharded training: FSDP2 through Lightning's ``ModelParallelStrategy``, every rank a
data-parallel rank.

``ModelParallelStrategy``'s defaults make one node a tensor-parallel group
(``tensor_parallel_size: auto`` = the devices of a node, ``data_parallel_size: auto`` = the
nodes). A module that only applies ``fully_shard`` over ``device_mesh["data_parallel"]``,
as Lightning's FSDP2 docs show, would then keep whole replicas on one node while the
template feeds every rank its own samples: the ranks' weights drift apart with no error.
:class:`FSDP2Strategy` (``configs/fsdp.yaml``) shards over all ranks instead; a tensor-parallel
group larger than one is refused (:func:`check_data_parallel`), since the plan and the global
order count every rank as a data-parallel rank.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from train_template import storage
from train_template.checkpoint_files import DISTRIBUTED_METADATA as METADATA
from train_template.errors import UserError
from train_template.seam.strategy import ModelParallelSeam


class FSDP2Strategy(ModelParallelSeam):
    """``ModelParallelStrategy`` whose ``data_parallel_size: auto`` is the world size and
    whose tensor-parallel group is one device: FSDP2 (``fully_shard``) over every rank.

    Checkpoints are Lightning's distributed-checkpoint folders (each rank writes only its
    own shard); the template's saves make them complete or absent (``atomic_save.py``)."""

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_parallel_size, tensor_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        if self.requested_data_parallel_size == "auto":
            # The world size is known here (set by the launcher); Lightning's own "auto"
            # (the number of nodes) is applied in super().setup_environment().
            tensor = self.requested_tensor_parallel_size
            tensor = 1 if tensor == "auto" else int(tensor)
            self.requested_data_parallel_size = max(
                1, self.num_nodes * self.num_processes // tensor
            )
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        """Lightning's sharded save; a folder in object storage (``s3://``, which Lightning's
        ``Path`` handling cannot address) through torch.distributed.checkpoint's fsspec
        writer. There, ``meta.pt`` is deleted first and written last, after every rank's
        shard and DCP's ``.metadata``: a folder without it is incomplete, never mixed."""
        # Lightning broadcasts the path itself; only the object-store branch needs its own.
        if not (storage.is_url(str(filepath)) and self.saves_distributed_checkpoint):
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = self.broadcast(str(filepath))
        from torch.distributed.checkpoint import FsspecWriter, save

        marker = storage.join(path, METADATA)
        if self.global_rank == 0:
            storage.remove(marker)
        self.barrier("sharding.save")
        shards = {"state_dict": checkpoint.pop("state_dict")}
        for index, state in enumerate(checkpoint.pop("optimizer_states", [])):
            shards[f"optimizer_{index}"] = state
        save(shards, storage_writer=FsspecWriter(path))  # ends when every rank's shard is in
        if self.global_rank == 0:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            storage.write_bytes(marker, buffer.getvalue())

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        """Lightning's sharded load (resharded to this world size by DCP); a folder in
        object storage through DCP's fsspec reader."""
        if not storage.is_url(str(checkpoint_path)):
            return super().load_checkpoint(checkpoint_path, weights_only)
        path = self.broadcast(str(checkpoint_path))
        from torch.distributed.checkpoint import FsspecReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        model = self.model
        weights = {"state_dict": get_model_state_dict(model)}
        load(weights, storage_reader=FsspecReader(path))
        model.load_state_dict(weights["state_dict"], strict=self.lightning_module.strict_loading)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(model, optimizer)}
            load(state, storage_reader=FsspecReader(path))
            options = StateDictOptions(cpu_offload=True)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state[key], options=options)
        metadata = storage.read_bytes(storage.join(path, METADATA))
        return torch.load(io.BytesIO(metadata), weights_only=weights_only, map_location="cpu")


def forward_is_collective(strategy: Any) -> bool:
    """True when every forward pass is a collective (FSDP all-gathers the parameters), so
    all ranks must run the same number of evaluation batches too."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy))


def check_data_parallel(strategy: Any) -> None:
    """One line instead of silently diverging replicas: the template's plan and sample
    order treat every rank as a data-parallel rank, so a tensor-parallel group must be 1."""
    if not isinstance(strategy, ModelParallelStrategy):
        return
    mesh = strategy.device_mesh
    tensor = mesh["tensor_parallel"].size() if "tensor_parallel" in mesh.mesh_dim_names else 1
    if tensor > 1:
        raise UserError(
            f"--trainer.strategy ModelParallelStrategy makes tensor-parallel groups of {tensor} "
            "ranks (its 'auto' default on one node), and the template plans every rank as a "
            "data-parallel rank: use --config configs/fsdp.yaml (FSDP2 over all ranks, "
            "tensor_parallel_size 1)"
        )
