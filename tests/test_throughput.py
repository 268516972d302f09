"""Throughput in the progress bar and the logs: the template's ThroughputMonitor (read on
logging steps only, Lightning's keys) on a module written from Lightning's docs, in one
real in-process ``fit``."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from plain_lightning import DocsStyleModule, MapStyleDataModule

from train_template.callbacks import ThroughputMonitor


def samples_in(batch: dict) -> int:
    return len(batch["label"])


def pixels_in(batch: dict) -> int:
    return batch["image"].numel()


def test_progress_bar_shows_samples_and_items_per_second_and_logs_lightnings_keys(tmp_path):
    monitor = ThroughputMonitor(samples_in, pixels_in, items_name="pixels")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=8,
        log_every_n_steps=2,
        limit_val_batches=0,
        callbacks=[monitor],
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(DocsStyleModule(), MapStyleDataModule(batch_size=16))

    bar = trainer.progress_bar_metrics
    assert bar["samples/s"] > 0 and bar["pixels/s"] > 0
    # 64 pixels per sample: the two rates are the same measurement
    assert abs(bar["pixels/s"] / bar["samples/s"] - 64) < 1e-6
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    columns = set(rows[0])
    assert {"train/device/samples_per_sec", "train/device/items_per_sec"} <= columns
    assert not {"samples/s", "pixels/s"} & columns  # the bar's copies stay out of the logs
