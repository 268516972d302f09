"""Resume latency: from `trainer.fit(ckpt_path=...)` to the first training batch, for a
checkpoint taken at 90% of an epoch vs one taken at its start (0%). A resume that
replayed the consumed data would grow with the position; litdata restores a state.

    .venv/bin/python scripts/bench/bench_resume.py [--samples 100000] [--repeats 5]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import bench_args, interleave, machine, quiet_trainer, synthetic_source, table

from examples.digits.data import DigitsDataModule
from examples.digits.module import ClassifierModule
from examples.digits.network import MLP
from examples.digits.prepare import prepare
from train_template.planned_trainer import PlannedTrainer
from train_template.steps import template_callbacks

BATCH = 32


class SaveAt(pl.Callback):
    def __init__(self, steps: dict[int, Path]):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.steps.pop(trainer.global_step))


class FirstBatch(pl.Callback):
    class Reached(Exception):
        pass

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.time = time.perf_counter()
        raise self.Reached


def trainer(callbacks, root: str) -> pl.Trainer:
    return quiet_trainer(
        [*template_callbacks(), *callbacks],
        root,
        trainer_class=PlannedTrainer,
        num_sanity_val_steps=0,
    )


def parts(data_dir: Path):
    torch.manual_seed(0)
    model = ClassifierModule(MLP(3 * 32 * 32, 10, 64))
    return model, DigitsDataModule(str(data_dir), batch_size=BATCH, shuffle=True)


def resume_seconds(data_dir: Path, checkpoint: Path) -> float:
    model, data = parts(data_dir)
    first = FirstBatch()
    start = time.perf_counter()
    try:
        trainer([first], str(data_dir.parent / "resume")).fit(
            model, data, ckpt_path=str(checkpoint)
        )
    except FirstBatch.Reached:
        pass
    return first.time - start


def main() -> None:
    args = bench_args(__doc__, 100_000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(
            str(synthetic_source(tmp / "synthetic.npz", args.samples)),
            tmp / "shards",
            num_workers=2,
            log=lambda *_: None,
        )
        steps_per_epoch = args.samples * 8 // 10 // BATCH + 1  # the train split, drop_last off
        at = {
            steps_per_epoch: tmp / "at-0.ckpt",
            steps_per_epoch + int(0.9 * steps_per_epoch): tmp / "at-90.ckpt",
        }
        model, data = parts(tmp / "shards")
        saver = SaveAt(dict(at))
        trainer([saver], str(tmp / "first")).fit(model, data)
        assert not saver.steps, f"checkpoints not taken: {saver.steps}"
        results = interleave(
            {
                "checkpoint at 0% of epoch 2": lambda: resume_seconds(
                    tmp / "shards", at[steps_per_epoch]
                ),
                "checkpoint at 90% of epoch 2": lambda: resume_seconds(
                    tmp / "shards", max(at.items())[1]
                ),
            },
            args.repeats,
        )
    print(
        f"# Resume latency\n\n{machine()}\n\n{args.samples} samples, {steps_per_epoch} steps per epoch\n"
    )
    print(
        table(
            "seconds from fit(ckpt_path) to the first batch",
            results,
            "s",
            "checkpoint at 0% of epoch 2",
        )
    )


if __name__ == "__main__":
    main()
