"""Per-step training time: the template's fit machinery vs a hand-written PyTorch loop.

Same network, same StreamingDataLoader batches, same optimizer and LR schedule. "bare
Lightning" is a module with no logging, metrics or callbacks; "template machinery" is
the same module under the template's trainer with every callback the CLI always adds
(plan, guards, checkpoint-RNG, preemption, per-step LR, RunCheckpoint) and a CSV
logger: their ratio is the template's own per-step cost. "template + example module"
adds the digits ClassifierModule (train accuracy, logging as the default config does).
Timed: one warm epoch.

    .venv/bin/python scripts/bench/bench_step.py [--repeats 5]
    .venv/bin/python scripts/bench/bench_step.py --accelerator gpu --precision bf16-mixed

On a GPU the raw loop moves each batch to the device and runs under
``torch.autocast(bfloat16)``, the Lightning cases use ``precision="bf16-mixed"``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import bench_args, interleave, machine, quiet_trainer, table

from examples.digits.data import DigitsDataModule, images_to_float  # noqa: E402
from examples.digits.module import ClassifierModule  # noqa: E402
from examples.digits.network import MLP, SmallCNN  # noqa: E402
from examples.digits.prepare import prepare  # noqa: E402
from train_template.checkpointing import RunCheckpoint  # noqa: E402
from train_template.planning import PlannedTrainer  # noqa: E402
from train_template.schedule import LRSchedule, PlannedLRLambda  # noqa: E402
from train_template.steps import template_callbacks  # noqa: E402

SIZES = {
    # name: (network factory, batch size)
    "tiny (MLP 64-128-10, batch 32)": (lambda: MLP(64, 10, 128), 32),
    "compute-bound (CNN width 256, batch 256)": (lambda: SmallCNN(10, 1, 8, 256, 0.0), 256),
}


def sync() -> None:
    """Queued GPU work counts: wait for it before reading the clock."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        sync()
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.num_training_batches


def template_epoch(
    data_dir: Path, network, batch_size: int, log_dir: str, example: bool, **device
) -> float:
    """The machinery as the CLI sets it up; with the bare module (``example=False``) the
    difference to "bare Lightning" is the template's own per-step cost."""
    torch.manual_seed(0)
    if example:
        model = ClassifierModule(network(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    else:
        model = BareModule(network())
    data = DigitsDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    timer = EpochTimer()
    # Every callback the CLI adds to a fit (RunCheckpoint saves at epoch ends, after the
    # timer has stopped; its per-step hook is timed).
    checkpoint = RunCheckpoint(dirpath=str(Path(log_dir) / "checkpoints"), save_last=True)
    trainer = quiet_trainer(
        [
            *template_callbacks(
                lr_schedule=LRSchedule(warmup_fraction=0.05), checkpoint=checkpoint
            ),
            timer,
        ],
        log_dir,
        logger=pl.loggers.CSVLogger(log_dir),
        log_every_n_steps=10,  # as configs/default.yaml
        trainer_class=PlannedTrainer,
        enable_checkpointing=True,
        **device,
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
        factor = PlannedLRLambda(LRSchedule(), 0, 10**6)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def bare_lightning_epoch(data_dir: Path, network, batch_size: int, log_dir: str, **device) -> float:
    torch.manual_seed(0)
    data = DigitsDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    timer = EpochTimer()
    trainer = quiet_trainer([timer], log_dir, **device)
    trainer.fit(BareModule(network()), data)
    return timer.seconds / timer.steps * 1000


def raw_epoch(data_dir: Path, network, batch_size: int, accelerator: str, precision: str) -> float:
    torch.manual_seed(0)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    net = network().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = DigitsDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    data.setup("fit")
    loader = data.train_dataloader()
    factor = PlannedLRLambda(LRSchedule(), len(loader) // 20, 2 * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(2):  # epoch 1 warms up like the template's
        sync()
        start = time.perf_counter()
        for batch in loader:
            batch = images_to_float({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            images, labels = batch["image"], batch["label"]
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = torch.nn.functional.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        sync()
        seconds = time.perf_counter() - start
    return seconds / len(loader) * 1000


def main() -> None:
    args = bench_args(__doc__, device=True)
    device = {"accelerator": args.accelerator, "precision": args.precision}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "digits"
        prepare("digits", data_dir, num_workers=0, log=lambda *_: None)
        print(f"# Per-step time: template vs raw loop\n\n{machine()}, {device}\n")
        for size, (network, batch_size) in SIZES.items():
            results = interleave(
                {
                    "raw PyTorch loop": lambda n=network, b=batch_size: raw_epoch(
                        data_dir, n, b, **device
                    ),
                    "bare Lightning": lambda n=network, b=batch_size: bare_lightning_epoch(
                        data_dir, n, b, tmp, **device
                    ),
                    "template machinery": lambda n=network, b=batch_size: template_epoch(
                        data_dir, n, b, tmp, False, **device
                    ),
                    "template + example module": lambda n=network, b=batch_size: template_epoch(
                        data_dir, n, b, tmp, True, **device
                    ),
                },
                args.repeats,
            )
            print(table(f"{size}: ms per optimizer step", results, "ms", "raw PyTorch loop"))
            median = {name: sorted(v)[len(v) // 2] for name, v in results.items()}
            ratio = median["template machinery"] / median["bare Lightning"]
            print(f"\ntemplate machinery / bare Lightning (same module): {ratio:.3f}x\n")


if __name__ == "__main__":
    main()
