"""The digits LightningModule: loss, metrics, optimizer and LR schedule. Replace it with yours.

It wraps a plain ``nn.Module`` (``network.py``) and never reads files or the
environment. It uses the machinery only as any module can: its LR schedule is
``train_template.schedule.planned_optimization`` (the run's ``--lr_schedule``, sized from
``trainer.estimated_stepping_batches``, the training plan) and it logs the training loss
on Lightning's logging steps only (``train_template.is_logging_step``).
Exact resume, the plan, the short-window gradient fix and the guards come from the
template's callbacks, not from anything written here.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from examples.digits.network import SmallCNN
from train_template import is_logging_step, planned_optimization


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)


class ClassifierModule(pl.LightningModule):
    """Image classifier with stage-prefixed metrics (``train/loss``, ``val/acc``, ``test/acc``)."""

    def __init__(
        self,
        network: nn.Module | None = None,
        num_classes: int = 10,
        optimizer: OptimizerCallable = _adamw,
        compile: bool = False,
    ) -> None:
        """
        Args:
            network: The plain ``nn.Module`` that maps images to class logits
                (default: ``SmallCNN()`` for 8x8 digits).
            num_classes: Number of classes, for the accuracy metrics.
            optimizer: Optimizer factory; its ``lr`` is the peak LR of ``--lr_schedule``.
            compile: ``torch.compile`` the network (in place: the parameter names, so the
                checkpoints, are the same with it on or off).
        """
        super().__init__()
        # No save_hyperparameters(): the CLI saves the full config.yaml beside the logs,
        # and LightningCLI would merge checkpoint hparams back over the user's options.
        self.network = network if network is not None else SmallCNN(num_classes)
        self.optimizer_factory = optimizer
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Losses as metrics: synced once per epoch, never a collective per batch, so
        # ranks with unequal validation batch counts cannot hang.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.compile_network = compile
        self._compiled = False

    def configure_model(self) -> None:
        if self.compile_network and not self._compiled:
            self.network.compile()  # nn.Module.compile: in place, no _orig_mod. in names
            self._compiled = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        # update(), not forward(): no per-batch accuracy computed, and the metric is logged
        # once per epoch below; self.log of a Metric object costs ~0.6 ms per call.
        self.train_acc.update(logits, batch["label"])
        # Only on the steps Lightning writes (every log_every_n_steps; it drops the others):
        # each self.log call is a measurable share of a tiny model's step.
        if is_logging_step(self.trainer):
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        self.val_loss(F.cross_entropy(logits, batch["label"]), len(batch["label"]))
        self.log("val/loss", self.val_loss)
        self.val_acc(logits, batch["label"])
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        self.test_loss(F.cross_entropy(logits, batch["label"]), len(batch["label"]))
        self.log("test/loss", self.test_loss)
        self.test_acc(logits, batch["label"])
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        logits = self(batch["image"])
        return {"index": batch["index"], "prediction": logits.argmax(dim=-1)}

    def configure_optimizers(self) -> dict:
        # The run's LR curve (--lr_schedule.*), as long as the training plan.
        return planned_optimization(self.optimizer_factory(self.parameters()), self.trainer)
