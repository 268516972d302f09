"""A map-style data module of any size whose items are made from their index: only the
sample order costs memory, which is what ``bench_order.py`` measures at 1e9 samples.
Written as Lightning's docs show (a plain ``DataLoader(shuffle=True)``): the template
trains it in its global order like any user's loader."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset


class IndexItems(Dataset):
    """Item ``i``: 64 features and a label computed from ``i`` (digits-shaped)."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        return {"image": torch.rand(64, generator=generator), "label": index % 10, "index": index}


class IndexDataModule(L.LightningDataModule):
    def __init__(self, num_samples: int = 10**9, batch_size: int = 32) -> None:
        super().__init__()
        self.num_samples, self.batch_size = num_samples, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(IndexItems(self.num_samples), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(IndexItems(64), batch_size=self.batch_size)
