"""The non-finite guard: stop on a NaN or infinite loss, and never let a checkpoint written
after one (or holding non-finite weights) replace the last good checkpoint.

No host sync per step: every step only adds the loss to a float32 sum kept on the loss's
device (one kernel; a NaN or an infinity anywhere makes the sum non-finite, and it is
reset at every reading, so it stays a sum of a few finite losses). The sum is read (one sync; with several processes one all-reduce through
the strategy, so all ranks stop together) on Lightning's logging steps, where it syncs for
logging anyway, at every epoch end and before every checkpoint save. A save is refused
from inside ``on_save_checkpoint``, so ``last.ckpt`` stays the last good one.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from train_template.errors import UserError

_ADVICE = (
    "lower the learning rate (your --model option for it) or set "
    "--trainer.gradient_clip_val; the last good checkpoint is kept"
)


class FiniteGuard:
    """Part of ``steps.RunMachinery``: folds each step's loss, checks at sync points."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None  # on the device: the losses since the last read

    def fold(self, outputs: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach()
        if loss.dim():
            loss = loss.sum()
        if self._sum is None:
            self._sum = loss.float().clone()
        else:
            self._sum.add_(loss)

    def check_loss(self, trainer: pl.Trainer, where: str) -> None:
        losses, self._sum = self._sum, None
        bad = losses is not None and not bool(torch.isfinite(losses))
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise UserError(
                f"the training loss became non-finite by {where} (global step "
                f"{trainer.global_step}): {_ADVICE}"
            )

    def check_before_save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank builds the checkpoint (rank 0 writes it): a collective is safe here.
        self.check_loss(trainer, "this checkpoint")
        # A finite loss can still be followed by an update that makes weights inf/NaN.
        # One sync for all parameters; decided together (FSDP shards differ per rank).
        # A sharded parameter (FSDP2's DTensor) is checked on this rank's shard only.
        params = [local_shard(p) for p in pl_module.parameters()]
        bad = bool(params) and not bool(
            torch.stack([torch.isfinite(p).all() for p in params]).all()
        )
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            name = next(
                (
                    n
                    for n, p in pl_module.named_parameters()
                    if not torch.isfinite(local_shard(p)).all()
                ),
                "on another rank",
            )
            raise UserError(
                f"the weights became non-finite ({name}) at global step {trainer.global_step}: "
                f"{_ADVICE}"
            )


def local_shard(parameter: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard, any other tensor itself."""
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter
