"""The non-finite guard: stop on a NaN or infinite loss, and never let a checkpoint written
after one (or holding non-finite weights) replace the last good checkpoint.

No host sync and no kernel per step: every step keeps its loss tensor in a list (the
detached copy Lightning makes for the callbacks in automatic optimization; a copy of the
module's own in manual optimization), every ``FOLD_EVERY`` losses are summed into one on
their device (a NaN or an infinity anywhere makes the sum non-finite; it is reset at every
reading, so it stays a sum of a few finite losses). The sum is read (one sync; with
several processes one all-reduce through the strategy, so all ranks stop together) on
Lightning's logging steps, where it syncs for logging anyway, at every epoch end and
before every checkpoint save. A save is refused from inside ``on_save_checkpoint``, so
``last.ckpt`` stays the last good one.
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


# Losses kept before they are summed into one: a list append per step instead of a kernel
# (two on a loss of the module's own), and one stack-and-sum every FOLD_EVERY steps.
FOLD_EVERY = 64


class FiniteGuard:
    """Part of ``steps.RunMachinery``: folds each step's loss, checks at sync points."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []  # on the device: the losses since the last read
        self._copy = True  # False where each loss is a copy made for the callbacks

    def start(self, pl_module: pl.LightningModule) -> None:
        """At train start. Automatic optimization hands the callbacks a detached copy of
        the loss (``ClosureResult``), kept as it is; manual optimization the module's own
        tensor (detached), which the module may change in place later: copied."""
        self._copy = not pl_module.automatic_optimization

    def fold(self, outputs: Any) -> None:
        # A manual-optimization module returns nothing, as Lightning's docs show: {}.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if loss.dim():
            loss = loss.detach().sum()  # a new 0-dim tensor
        elif self._copy:
            loss = loss.detach().clone()
        losses = self._losses
        losses.append(loss)
        if len(losses) >= FOLD_EVERY:
            self._losses = [_total(losses)]

    def check_loss(self, trainer: pl.Trainer, where: str) -> None:
        losses, self._losses = self._losses, []
        bad = bool(losses) and not bool(torch.isfinite(_total(losses)))
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


def _total(losses: list[torch.Tensor]) -> torch.Tensor:
    """The float32 sum of 0-dim losses on one device (float32: 64 fp16 losses of 2000 each
    would overflow fp16 and read as non-finite)."""
    return torch.sum(torch.stack(losses), dtype=torch.float32)
