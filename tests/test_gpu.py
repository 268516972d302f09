"""On a CUDA machine (skipped elsewhere; run by scripts/gpu_check.sh): every collective
the template makes is accepted by NCCL, whose process groups reject CPU tensors.

A one-device DDP run through the NCCL backend calls the template's own collectives
(the preemption agreement, the finite-loss decision, the plan's batch-count gather)
with the tensors and devices the template gives them, and trains in bf16."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_template_collectives_run_under_nccl(tmp_path):
    import lightning.pytorch as pl
    from conftest import write_shards
    from plain_lightning import DocsStyleModule
    from shard_data import ShardData

    from train_template.options import PreemptionOptions
    from train_template.planned_trainer import PlannedTrainer, _batch_counts_of_all_ranks
    from train_template.preemption import PreemptionSave
    from train_template.steps import template_callbacks

    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx:
                return
            assert torch.distributed.get_backend() == "nccl"
            preemption = PreemptionSave(PreemptionOptions(check_every_n_steps=1))
            local = torch.tensor([0], device=trainer.strategy.root_device)
            seen["signal"] = int(trainer.strategy.reduce(local, reduce_op="max").item())
            seen["decision"] = trainer.strategy.reduce_boolean_decision(False, all=False)
            seen["counts"] = trainer.strategy.all_gather(
                torch.tensor([3], device=trainer.strategy.root_device)
            ).tolist()
            seen["agreed"] = preemption._agreed_signal(trainer)
            seen["batch_counts"] = _batch_counts_of_all_ranks(trainer, 7)

    data = write_shards(tmp_path / "data", 96)
    trainer = PlannedTrainer(
        accelerator="gpu",
        devices=1,
        strategy="ddp",
        precision="bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[*template_callbacks(), Probe()],
    )
    trainer.fit(DocsStyleModule(), ShardData(str(data), batch_size=16))
    # strategy.all_gather stacks a world dimension: (world size 1, 1 element) -> [[3]]
    assert seen == {
        "signal": 0,
        "decision": False,
        "counts": [[3]],
        "agreed": 0,
        "batch_counts": [7],
    }
    assert trainer.global_step == trainer.training_plan.max_steps
