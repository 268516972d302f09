"""The machinery tests' own litdata data: a ``StreamingDataModule`` subclass written as a
user of the template writes one (it says only how samples become a batch), over the tiny
shards ``conftest.write_shards`` makes. Tests select it with ``--data shard_data.ShardData``
(``tests/`` is on the path of every process the tests start)."""

from __future__ import annotations

from typing import Any

import torch

from train_template import StreamingDataModule


class ShardData(StreamingDataModule):
    """Samples ``{"index", "image" (64 uint8 bytes), "label"}`` -> a batch of floats in
    [0, 1] (what ``plain_lightning.DocsStyleModule`` trains on), labels and sample ids."""

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = bytearray().join(sample["image"] for sample in samples)
        return {
            "index": torch.tensor([sample["index"] for sample in samples]),
            "image": torch.frombuffer(images, dtype=torch.uint8).view(len(samples), -1).float()
            / 255.0,
            "label": torch.tensor([sample["label"] for sample in samples]),
        }


class HparamsShardData(ShardData):
    """``ShardData`` that keeps its arguments as hyperparameters, as many data modules do
    (Lightning then writes them into checkpoints and the loggers' hparams)."""

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 32,
        shuffle: bool = True,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__(
            data_dir, batch_size=batch_size, shuffle=shuffle, storage_options=storage_options
        )
        self.save_hyperparameters()
