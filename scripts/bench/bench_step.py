"""Per-step training time: the template's fit machinery vs a hand-written PyTorch loop.

Same network, same StreamingDataLoader batches, same optimizer and LR schedule; the
template runs the real ClassifierModule with the plan, guards, checkpoint-RNG and
preemption callbacks and a CSV logger logging every step. Timed: one warm epoch.

    .venv/bin/python scripts/bench/bench_step.py [--repeats 5]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import bench_args, interleave, machine, quiet_trainer, table

from train_template.callbacks import FiniteLossGuard, TrainingPlanCallback  # noqa: E402
from train_template.checkpointing import RNGStateCallback, SaveOnPreemption  # noqa: E402
from train_template.data import ShardDataModule  # noqa: E402
from train_template.data_prep import prepare  # noqa: E402
from train_template.module import ClassifierModule  # noqa: E402
from train_template.network import MLP, SmallCNN  # noqa: E402
from train_template.schedule import LRSchedule, PlannedLRLambda  # noqa: E402

SIZES = {
    # name: (network factory, batch size)
    "tiny (MLP 64-128-10, batch 32)": (lambda: MLP(64, 10, 128), 32),
    "compute-bound (CNN width 256, batch 256)": (lambda: SmallCNN(10, 1, 8, 256, 0.0), 256),
}


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.num_training_batches


def template_epoch(data_dir: Path, network, batch_size: int, log_dir: str) -> float:
    torch.manual_seed(0)
    model = ClassifierModule(network(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = ShardDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    timer = EpochTimer()
    trainer = quiet_trainer(
        logger=pl.loggers.CSVLogger(log_dir),
        log_every_n_steps=1,
        callbacks=[
            TrainingPlanCallback(warmup_fraction=0.05),
            FiniteLossGuard(),
            RNGStateCallback(),
            SaveOnPreemption(),
            pl.callbacks.LearningRateMonitor("step"),
            timer,
        ],
    )
    trainer.fit(model, data)  # epoch 1 warms up; the timer keeps epoch 2
    return timer.seconds / timer.steps * 1000


class BareModule(pl.LightningModule):
    """The least Lightning can run: no logging, no metrics, no callbacks."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.network(batch["image"]), batch["label"])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        factor = PlannedLRLambda(LRSchedule())
        factor.set_length(0, 10**6)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def bare_lightning_epoch(data_dir: Path, network, batch_size: int) -> float:
    torch.manual_seed(0)
    data = ShardDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    timer = EpochTimer()
    trainer = quiet_trainer([timer])
    trainer.fit(BareModule(network()), data)
    return timer.seconds / timer.steps * 1000


def raw_epoch(data_dir: Path, network, batch_size: int) -> float:
    torch.manual_seed(0)
    net = network()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = ShardDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    data.setup("fit")
    loader = data.train_dataloader()
    factor = PlannedLRLambda(LRSchedule())
    factor.set_length(len(loader) // 20, 2 * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(2):  # epoch 1 warms up like the template's
        start = time.perf_counter()
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(net(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        seconds = time.perf_counter() - start
    return seconds / len(loader) * 1000


def main() -> None:
    args = bench_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "digits"
        prepare("digits", data_dir, num_workers=0, log=lambda *_: None)
        print(f"# Per-step time: template vs raw loop\n\n{machine()}\n")
        for size, (network, batch_size) in SIZES.items():
            results = interleave(
                {
                    "raw PyTorch loop": lambda n=network, b=batch_size: raw_epoch(data_dir, n, b),
                    "bare Lightning": lambda n=network, b=batch_size: bare_lightning_epoch(
                        data_dir, n, b
                    ),
                    "template fit": lambda n=network, b=batch_size: template_epoch(
                        data_dir, n, b, tmp
                    ),
                },
                args.repeats,
            )
            print(table(f"{size}: ms per optimizer step", results, "ms", "raw PyTorch loop"))
            print()


if __name__ == "__main__":
    main()
