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

from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy

from train_template.errors import UserError


class FSDP2Strategy(ModelParallelStrategy):
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
        if self._data_parallel_size == "auto":
            # The world size is known here (set by the launcher); Lightning's own "auto"
            # (the number of nodes) is applied in super().setup_environment().
            tensor = 1 if self._tensor_parallel_size == "auto" else int(self._tensor_parallel_size)
            self._data_parallel_size = max(1, self.num_nodes * self.num_processes // tensor)
        super().setup_environment()


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
