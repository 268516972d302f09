"""The non-finite guard sees every step's loss (guards.FiniteGuard), in a real fit.

The guard keeps each step's loss tensor and sums them every ``FOLD_EVERY`` steps; the sum
is read on logging steps and at the epoch end. One infinite loss among 150 finite ones,
read only at the epoch end (after two such sums), must stop the fit, in automatic
optimization (the loss is Lightning's own copy) and in manual optimization, where the
module hands back a tensor of its own that it overwrites on the next step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import write_shards
from plain_lightning import DocsStyleModule
from shard_data import ShardData
from test_plan_lightning import quiet_trainer

from train_template.errors import UserError
from train_template.guards import FOLD_EVERY
from train_template.steps import template_callbacks

SPIKE_AT = 10  # the batch whose loss is infinite; its gradients stay finite


class OneInfiniteLoss(DocsStyleModule):
    """Reports an infinite loss at batch ``SPIKE_AT`` only (a constant added to it, so the
    gradients and weights stay finite and every other loss too)."""

    def __init__(self, manual: bool) -> None:
        super().__init__(dropout=0.0)
        self.automatic_optimization = not manual
        self.register_buffer("reported", torch.zeros(()))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch["image"]), batch["label"])
        spike = float("inf") if batch_idx == SPIKE_AT else 0.0
        if self.automatic_optimization:
            return loss + spike
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.reported.copy_(loss.detach() + spike)  # overwritten by the next step
        return self.reported


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_one_infinite_loss_among_many_stops_the_fit_at_the_epoch_end(tmp_path, manual):
    steps = 150
    assert steps > 2 * FOLD_EVERY + SPIKE_AT  # the spike is in a sum of sums when read
    data = ShardData(str(write_shards(tmp_path / "shards", steps * 8)), batch_size=8)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=1,
        log_every_n_steps=1000,  # no logging step: the epoch end is the only reading
        callbacks=template_callbacks(),
    )
    with pytest.raises(UserError, match=r"non-finite by epoch 0 \(global step 150\)"):
        trainer.fit(OneInfiniteLoss(manual), data)
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
