"""A module written the way Lightning's docs show that also uses the template's two public
hooks, as a fork's own module would: its LR schedule is the run's ``--lr_schedule.*`` curve
(``train_template.planned_optimization``) and it logs on the steps Lightning writes
(``train_template.is_logging_step``)."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

from train_template import is_logging_step, planned_optimization


def mlp(hidden: int = 128) -> nn.Module:
    """64 pixels -> 10 classes; seeded the same, built the same (tests rebuild it)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class PlannedLRModule(L.LightningModule):
    """A small classifier on ``{"image", "label"}`` batches with the planned LR curve."""

    def __init__(self, lr: float = 0.1, hidden: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(hidden)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch["image"]), batch["label"])
        if is_logging_step(self.trainer):
            self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self.net(batch["image"]), batch["label"]))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return planned_optimization(optimizer, self.trainer)
