"""Throughput in the progress bar and the logs: the template's ThroughputMonitor (read on
logging steps only, Lightning's keys) on a module written from Lightning's docs, in one
real in-process ``fit``."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger
from plain_lightning import DocsStyleModule, MapStyleDataModule

from train_template.callbacks import ThroughputMonitor


def samples_in(batch: dict) -> int:
    return len(batch["label"])


def pixels_in(batch: dict) -> int:
    return batch["image"].numel()


def fit(tmp_path, module, monitor: ThroughputMonitor, max_steps: int, log_every: int):
    """A real in-process fit of ``module`` on the map-style digits, batch 16, CSV logs."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        log_every_n_steps=log_every,
        limit_val_batches=0,
        callbacks=[monitor],
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, MapStyleDataModule(batch_size=16))
    return trainer, list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))


def test_progress_bar_shows_samples_and_items_per_second_and_logs_lightnings_keys(tmp_path):
    monitor = ThroughputMonitor(samples_in, pixels_in, items_name="pixels")
    trainer, rows = fit(tmp_path, DocsStyleModule(), monitor, 8, 2)

    bar = trainer.progress_bar_metrics
    assert bar["samples/s"] > 0 and bar["pixels/s"] > 0
    # 64 pixels per sample: the two rates are the same measurement
    assert abs(bar["pixels/s"] / bar["samples/s"] - 64) < 1e-6
    columns = set(rows[0])
    assert {"train/device/samples_per_sec", "train/device/items_per_sec"} <= columns
    assert not {"samples/s", "pixels/s"} & columns  # the bar's copies stay out of the logs


def test_flops_are_counted_on_the_first_batch_and_mfu_uses_the_stated_peak(tmp_path, caplog):
    """The docs-style module states no FLOPs: the first batch is counted as it runs. Its
    matmuls at batch 16: forward 2*16*64*64 + 2*16*64*10, backward the second layer's
    input and weight gradients and the first layer's weight gradient (its input needs
    none): 323,584 FLOPs. A stated peak (this CPU has none in Lightning's table) gives MFU."""
    peak = 1e9
    monitor = ThroughputMonitor(peak_flops_per_sec=peak)
    with caplog.at_level("INFO"):
        trainer, rows = fit(tmp_path, DocsStyleModule(), monitor, 12, 3)
    forward = 2 * 16 * 64 * 64 + 2 * 16 * 64 * 10
    backward = 2 * (2 * 16 * 10 * 64) + 2 * 16 * 64 * 64
    assert monitor._flops.per_batch == forward + backward == 323_584
    assert "first 2 training batches:" in caplog.text and "0.000324 GFLOP per batch" in caplog.text
    logged = [r for r in rows if r.get("train/device/flops_per_sec")]
    assert logged, "no FLOP/s logged"
    for row in logged:
        flops, samples = (
            float(row["train/device/flops_per_sec"]),
            float(row["train/device/samples_per_sec"]),
        )
        assert flops == pytest.approx(samples / 16 * 323_584, rel=1e-6)  # full batches only
        assert float(row["train/device/mfu"]) == pytest.approx(flops / peak, rel=1e-9)
    bar = trainer.progress_bar_metrics
    assert bar["TFLOP/s"] > 0 and bar["MFU"] > 0


def test_a_module_that_states_its_flops_is_not_counted(tmp_path, caplog):
    class Stated(DocsStyleModule):
        flops_per_batch = 1e6

    monitor = ThroughputMonitor()
    trainer, rows = fit(tmp_path, Stated(), monitor, 9, 3)
    assert monitor._flops.per_batch == 1e6
    assert any(r.get("train/device/flops_per_sec") for r in rows)
    assert not any(r.get("train/device/mfu") for r in rows)  # a CPU: no known peak


def test_a_module_without_countable_flops_gets_the_rest_and_one_line(tmp_path, caplog):
    import torch

    class Elementwise(DocsStyleModule):
        def training_step(self, batch, batch_idx):  # no matmul: nothing FLOPs count
            return ((batch["image"] * self.net[1].bias.mean()) ** 2).mean()

    torch.manual_seed(0)
    with caplog.at_level("INFO"):
        trainer, rows = fit(tmp_path, Elementwise(), ThroughputMonitor(), 6, 3)
    assert (
        "FLOP/s and MFU are not shown: the FLOPs of a training batch could not be counted (no matmul"
        in caplog.text
    )
    assert any(r.get("train/device/samples_per_sec") for r in rows)
    assert not any(r.get("train/device/flops_per_sec") for r in rows)
