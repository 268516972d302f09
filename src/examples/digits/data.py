"""The digits data module: how a digits sample becomes a batch. Replace it with yours.

The streaming, sharding, padding and exact-resume machinery is inherited from
``train_template.streaming.StreamingDataModule``; this file only says what a batch
looks like. A batch is a dict: ``image`` (floats in [0, 1] once on the device, one
row of ``C*H*W`` pixels per sample), ``label`` (int64) and ``index`` (int64, the
sample's position in the source).
"""

from __future__ import annotations

from typing import Any

import torch

from train_template import StreamingDataModule


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack litdata samples into tensors; images stay uint8 (see ``images_to_float``).

    The image is a ``bytes`` field; torch's default collate would turn each into one
    tensor per byte (about 200x slower). One C-level join into a writable buffer is the
    only copy (108 us per batch of 256 3x32x32 images, against 129 us with a bytes join +
    copy and more with a per-row ``np.frombuffer`` loop).
    """
    images = bytearray().join([sample["image"] for sample in samples])
    return {
        "index": torch.tensor([sample["index"] for sample in samples], dtype=torch.long),
        "image": torch.frombuffer(images, dtype=torch.uint8).view(len(samples), -1),
        "label": torch.tensor([sample["label"] for sample in samples], dtype=torch.long),
    }


def images_to_float(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 pixels -> floats in [0, 1], after the batch reached its device.

    Converting on the device keeps the loader's work and the host-to-GPU copy at one
    byte per pixel instead of four (the loader measured 137k -> 164k samples/s).
    """
    batch["image"] = batch["image"].float().div_(255.0)
    return batch


class DigitsDataModule(StreamingDataModule):
    """Image-classification shards written by ``scripts/prepare_data.py`` (digits by default).

    ``fit`` on the default ``data_dir`` builds the embedded digits shards first when
    they are missing (``prepare_data``, one process per node, under a file lock).
    """

    prepare_command = "python scripts/prepare_data.py --out {data_dir}"

    def __init__(self, data_dir: str = "data/digits", **kwargs: Any) -> None:
        """
        Args:
            data_dir: Root of the optimized shards (``train/``, ``val/``, ``test/``); a local
                path or a URL litdata understands.
        """
        super().__init__(data_dir=data_dir, **kwargs)

    def prepare_data(self) -> None:
        # Only the embedded default is built on demand: a user's own data_dir that is
        # missing is a mistake to report, not something to fill with digits.
        if self.data_dir == "data/digits":
            from examples.digits.prepare import prepare

            prepare("digits", self.data_dir, num_workers=0)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_samples(samples)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return images_to_float(batch)
