"""The LightningModule: loss, metrics, optimizer and the planned LR schedule.

It wraps a plain ``nn.Module`` (``network.py``) and never reads files or the
environment. Its schedule length is unknown until the training plan exists, so the
plan callback calls :meth:`ClassifierModule.apply_plan` once the real train loader
has been measured.
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

from train_template.errors import UserError
from train_template.plan import TrainingPlan, accumulation_window_size
from train_template.schedule import LRSchedule, PlannedLRLambda


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)


class ClassifierModule(pl.LightningModule):
    """Image classifier with stage-prefixed metrics (``train/loss``, ``val/acc``, ``test/acc``)."""

    def __init__(
        self,
        network: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = _adamw,
        lr_schedule: LRSchedule | None = None,
        scale_partial_accumulation: bool = True,
    ) -> None:
        """
        Args:
            network: The plain ``nn.Module`` that maps images to class logits.
            num_classes: Number of classes, for the accuracy metrics.
            optimizer: Optimizer factory; its ``lr`` is the peak LR of the schedule.
            lr_schedule: Warmup/decay shape; the length comes from the training plan.
            scale_partial_accumulation: Weight the epoch's last, short accumulation window
                as a full one (Lightning divides its loss by the full window size).
        """
        super().__init__()
        # No save_hyperparameters(): the CLI saves the full config.yaml beside the logs,
        # and LightningCLI would merge checkpoint hparams back over the user's options.
        self.network = network
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule or LRSchedule()
        self.scale_partial_accumulation = scale_partial_accumulation
        self.lr_lambda = PlannedLRLambda(self.lr_schedule)
        self.plan: TrainingPlan | None = None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Losses as metrics: synced once per epoch, never a collective per batch, so
        # ranks with unequal validation batch counts cannot hang.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def apply_plan(self, plan: TrainingPlan) -> None:
        """Give the LR schedule its length and re-derive the LR of the current step.

        Called after a checkpoint is restored, so the scheduler's step counter is the
        resumed one and the LR curve continues where it stopped.
        """
        self.plan = plan
        self.lr_lambda.set_length(plan.warmup_steps, plan.max_steps)
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
            for group, base_lr, factor in zip(
                scheduler.optimizer.param_groups, scheduler.base_lrs, factors, strict=True
            ):
                group["lr"] = base_lr * factor
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning's strict load would stop with a multi-line key dump; name the mismatch.
        mine = self.state_dict()
        theirs = checkpoint.get("state_dict", {})
        missing = sorted(set(mine) - set(theirs))
        unexpected = sorted(set(theirs) - set(mine))
        resized = [k for k in mine if k in theirs and mine[k].shape != theirs[k].shape]
        if missing or unexpected or resized:
            detail = (
                f"missing {missing[:3]}"
                if missing
                else f"unexpected {unexpected[:3]}"
                if unexpected
                else f"{resized[0]} is {tuple(theirs[resized[0]].shape)} there, "
                f"{tuple(mine[resized[0]].shape)} here"
            )
            raise UserError(
                f"the checkpoint holds a different model ({detail}): use a checkpoint of this "
                "model, or the --model settings it was trained with"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        # update(), not forward(): no per-batch accuracy computed, and the metric is logged
        # once per epoch below; self.log of a Metric object costs ~0.6 ms per call.
        self.train_acc.update(logits, batch["label"])
        # Only on the steps Lightning writes (every log_every_n_steps; it would drop the
        # others): each self.log call costs ~0.3 ms, a quarter of a tiny model's step.
        # The same check Lightning's own LearningRateMonitor makes.
        trainer = self.trainer
        if trainer._logger_connector.should_update_logs or trainer.fast_dev_run:
            self.log("train/loss", loss, prog_bar=True)
        scale = self._partial_window_scale(batch_idx)
        return loss * scale if scale != 1.0 else loss

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc)

    def _partial_window_scale(self, batch_idx: int) -> float:
        # Lightning divides every loss by accumulate_grad_batches, also in the epoch's
        # last window when it holds fewer batches (Lightning #19987). Multiplying by
        # accumulate / real_window makes that step's gradient the mean over the batches
        # it really has, like every other step.
        if not self.scale_partial_accumulation or self.plan is None:
            return 1.0
        accumulate = self.plan.accumulate_grad_batches
        window = accumulation_window_size(batch_idx, self.plan.batches_per_epoch, accumulate)
        return accumulate / window

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
        optimizer = self.optimizer_factory(self.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
