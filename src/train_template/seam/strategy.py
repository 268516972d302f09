"""Lightning's ``ModelParallelStrategy`` (FSDP2 + tensor parallel), for
``sharding.FSDP2Strategy``. Pinned: lightning 2.6.6."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy


class ModelParallelSeam(ModelParallelStrategy):
    """``ModelParallelStrategy`` with public names for its mesh sizes and checkpoint format.

    Its ``"auto"`` sizes are resolved in ``setup_environment`` from private attributes and
    there is no other way to say "all ranks data-parallel"; whether it saves a
    distributed checkpoint is a constructor argument kept only privately.
    """

    @property
    def requested_data_parallel_size(self) -> Any:
        return self._data_parallel_size

    @requested_data_parallel_size.setter
    def requested_data_parallel_size(self, size: Any) -> None:
        self._data_parallel_size = size

    @property
    def requested_tensor_parallel_size(self) -> Any:
        return self._tensor_parallel_size

    @property
    def saves_distributed_checkpoint(self) -> bool:
        return self._save_distributed_checkpoint
