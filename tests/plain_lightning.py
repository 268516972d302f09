"""A LightningModule and a DataModule written the way Lightning's docs show, that have
never heard of this template. Tests select them with ``--model`` / ``--data``
(``tests/`` on PYTHONPATH) to prove the guarantees belong to the machinery."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset


class DocsStyleModule(L.LightningModule):
    """OneCycleLR sized from ``estimated_stepping_batches``, its own logging, dropout."""

    def __init__(self, lr: float = 0.05, hidden: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch["image"]), batch["label"]))

    def predict_step(self, batch, batch_idx):
        return self.net(batch["image"]).argmax(dim=-1)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class DigitsDicts(Dataset):
    """The scikit-learn digits as dicts, like the template's digits batches."""

    def __init__(self, start: int, stop: int) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = torch.tensor(digits.images[start:stop] / 16.0, dtype=torch.float32)
        self.labels = torch.tensor(digits.target[start:stop], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index].flatten(), "label": self.labels[index], "index": index}


class MapStyleDataModule(L.LightningDataModule):
    """A plain map-style DataLoader: no litdata, no train_layout."""

    def __init__(self, batch_size: int = 16, num_train: int = 403, drop_last: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_train = num_train
        self.drop_last = drop_last

    def setup(self, stage: str) -> None:
        self.train = DigitsDicts(0, self.num_train)
        self.val = DigitsDicts(1600, 1797)

    def train_dataloader(self):
        return DataLoader(
            self.train, batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last
        )

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=64)


class GrowingDataModule(MapStyleDataModule):
    """A faulty data module: each ``train_dataloader()`` call sees 16 more samples (a loader
    built from state that changes between calls), so the loader Lightning trains on is not
    the one the plan measured."""

    def train_dataloader(self):
        self.num_train += 16
        self.setup("fit")
        return super().train_dataloader()


class DigitsStream(IterableDataset):
    """The digits as an endless stream (or ``num_samples`` of it), with no ``__len__``:
    how Hugging Face streaming datasets and bucket readers look to a DataLoader."""

    def __init__(self, num_samples: int | None = None) -> None:
        self.digits = DigitsDicts(0, 1600)
        self.num_samples = num_samples

    def __iter__(self):
        produced = 0
        while self.num_samples is None or produced < self.num_samples:
            yield self.digits[produced % len(self.digits)]
            produced += 1


class StreamDataModule(L.LightningDataModule):
    """A train stream without a length; ``num_samples`` None never ends."""

    def __init__(self, batch_size: int = 16, num_samples: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples

    def train_dataloader(self):
        return DataLoader(DigitsStream(self.num_samples), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(DigitsDicts(1600, 1797), batch_size=64)


class StatefulStreamDataModule(StreamDataModule):
    """The same stream through torchdata's ``StatefulDataLoader``: a loader with
    ``state_dict``/``load_state_dict``, which Lightning saves in checkpoints and restores."""

    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(DigitsStream(self.num_samples), batch_size=self.batch_size)


class TokenModule(DocsStyleModule):
    """A docs-style module with an option that carries a secret (say, an experiment
    tracker's token), saved with its other hyperparameters as Lightning's docs show."""

    def __init__(
        self, api_token: str = "", lr: float = 0.05, hidden: int = 64, dropout: float = 0.3
    ) -> None:
        super().__init__(lr=lr, hidden=hidden, dropout=dropout)
        self.save_hyperparameters()

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self.net(batch["image"]), batch["label"]))


class ShardedDocsModule(DocsStyleModule):
    """``DocsStyleModule`` whose layers FSDP2 shards in ``configure_model``, as Lightning's
    ``ModelParallelStrategy`` docs show (one shard of every layer per rank)."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
