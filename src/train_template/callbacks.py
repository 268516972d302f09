"""Callbacks a config may add, beside the template's own (``steps.template_callbacks``):
throughput in the progress bar, the predictions file (added for ``predict``), and the
sample-id audit that proves an exact resume on your own data (``SampleIdRecorder``,
used by the tests and ``scripts/soak_kill.py``)."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size

from train_template.flops import BatchFlops, peak_flops_per_sec
from train_template.seam.loop import is_logging_step

# A launch's first batches: the FLOP count runs in the first (torch.compile waits while
# torch's counting mode is on), compilation in the first or the second.
WARM_UP_BATCHES = 2


class ThroughputMonitor(Callback):
    """Training throughput and hardware use in the progress bar and the logs, read on
    logging steps only.

    Lightning's ThroughputMonitor synchronizes the GPU after every training batch to time
    it, which stalls the GPU queue on every step. This one counts samples and items on
    the host every batch (``batch_size_fn``/``length_fn`` read shapes: no sync) and reads
    the clock only on Lightning's logging steps, after one ``torch.cuda.synchronize``
    there: each rate is over the batches since the previous logging step. The logs get
    Lightning's keys: ``train/time`` (training seconds so far, validation excluded),
    ``train/batches``, ``train/samples``, ``train/items``, ``train/device/samples_per_sec``,
    ``train/device/items_per_sec`` and ``train/device/flops_per_sec`` (this rank) and, with
    several ranks, ``train/samples_per_sec``, ``train/items_per_sec`` and
    ``train/flops_per_sec`` (times the world size, as Lightning estimates);
    ``train/device/mfu`` (and ``train/mfu``) where the device's peak is known. The FLOPs
    of a batch are the module's ``flops_per_batch``, else counted on the first batch of
    the launch (``flops.BatchFlops``). The progress bar shows ``samples/s``,
    ``<items_name>/s``, ``TFLOP/s`` for all ranks together and ``MFU``. The first
    batches' time (start-up, ``torch.compile``: ``WARM_UP_BATCHES``) is printed once and
    not counted as throughput.
    """

    def __init__(
        self,
        batch_size_fn: Callable[[Any], int] | None = None,
        length_fn: Callable[[Any], int] | None = None,
        items_name: str = "items",
        peak_flops_per_sec: float | None = None,
    ) -> None:
        """
        Args:
            batch_size_fn: Samples in a batch (default: the first dimension of the
                batch's first tensor, Lightning's ``extract_batch_size``).
            length_fn: Items (e.g. tokens) in a batch, or None.
            items_name: What an item is, for the bar's label (``tokens`` -> ``tokens/s``).
            peak_flops_per_sec: The peak FLOP/s of one device for MFU, where Lightning's
                table does not know it (a CPU, a new GPU); by default the table's value
                for the run's device and compute dtype, or no MFU.
        """
        # Typed as callables: jsonargparse turns "module.function" into the function.
        self.batch_size_fn = batch_size_fn or extract_batch_size
        self.length_fn = length_fn
        self.items_name = items_name
        self.peak_flops_per_sec = peak_flops_per_sec
        self._peak: float | None = None
        self._flops = BatchFlops()
        self._counts = [0, 0, 0.0]  # samples, items, flops since the last reading
        self._since: float | None = None  # the clock at the last reading
        self._first_batch: float | None = None  # the clock at this launch's first batch
        self._totals = {"time": 0.0, "batches": 0, "samples": 0, "items": 0}  # this rank

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._peak = peak_flops_per_sec(trainer, self.peak_flops_per_sec)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = None  # start-up and validation time are not training time

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flops.start(pl_module)
        if self._first_batch is None:
            self._first_batch = time.perf_counter()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._flops.abandon()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._flops.stop()
        samples = self.batch_size_fn(batch)
        items = self.length_fn(batch) if self.length_fn is not None else 0
        self._counts[0] += samples
        self._counts[1] += items
        self._counts[2] += self._flops.per_batch or 0.0
        self._totals["batches"] += 1
        self._totals["samples"] += samples
        self._totals["items"] += items
        if self._totals["batches"] == WARM_UP_BATCHES:
            self._report_warm_up(trainer)
        if not is_logging_step(trainer):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # queued work counts; once per logging step
        now = time.perf_counter()
        since, self._since = self._since, now
        samples, items, flops = self._counts
        self._counts = [0, 0, 0.0]
        if since is None or now <= since or self._totals["batches"] <= WARM_UP_BATCHES:
            return  # the first reading after the warm-up only sets the clock
        seconds = now - since
        self._totals["time"] += seconds
        self._log(trainer, pl_module, samples / seconds, items / seconds, flops / seconds)

    def _log(self, trainer, pl_module, samples_rate: float, items_rate: float, flops_rate: float):
        rates = {"samples_per_sec": samples_rate}
        if self.length_fn is not None:
            rates["items_per_sec"] = items_rate
        if flops_rate:
            rates["flops_per_sec"] = flops_rate
        totals = {k: v for k, v in self._totals.items() if k != "items" or self.length_fn}
        metrics = {f"train/{key}": value for key, value in totals.items()}
        metrics.update({f"train/device/{key}": value for key, value in rates.items()})
        world = trainer.world_size
        if world > 1:
            metrics.update({f"train/{key}": value * world for key, value in rates.items()})
        mfu = flops_rate / self._peak if flops_rate and self._peak else None
        if mfu is not None:  # every rank's share of its own device's peak: the same ratio
            metrics.update({"train/device/mfu": mfu, "train/mfu": mfu})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        shown = {"samples/s": "samples_per_sec", f"{self.items_name}/s": "items_per_sec"}
        for label, key in shown.items():
            if key in rates:
                pl_module.log(label, rates[key] * world, prog_bar=True, logger=False)
        if flops_rate:
            pl_module.log("TFLOP/s", flops_rate * world / 1e12, prog_bar=True, logger=False)
        if mfu is not None:
            pl_module.log("MFU", mfu, prog_bar=True, logger=False)

    def _report_warm_up(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # once: the warm-up's queued work
        seconds = time.perf_counter() - self._first_batch
        flops = self._flops.per_batch
        counted = f"; {flops / 1e9:.3g} GFLOP per batch on this rank" if flops else ""
        rank_zero_info(
            f"first {WARM_UP_BATCHES} training batches: {seconds:.1f} s (start-up, the FLOP "
            f"count, any torch.compile; not counted as throughput){counted}"
        )


class SampleIdRecorder(Callback):
    """Audit trail: which sample ids each training batch held, per rank, as JSON lines,
    and the plan each rank made (``plan-rank<R>.json``).

    A resumed run appends to the same file; for each (epoch, batch) the last line
    written is what the finished run trained on.
    """

    def __init__(self, out_dir: str, ids_field: str = "index") -> None:
        """
        Args:
            out_dir: Directory for ``samples-rank<R>.jsonl`` files.
            ids_field: The field of a (dict) batch that holds each sample's id.
        """
        self.out_dir = out_dir
        self.ids_field = ids_field
        self._lr: float | None = None
        self._plan_written = False

    def _write_plan(self, trainer: pl.Trainer) -> None:
        plan = getattr(trainer, "training_plan", None)
        if plan is not None:
            path = Path(self.out_dir) / f"plan-rank{trainer.global_rank}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(plan.to_json())
        self._plan_written = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._plan_written:
            self._write_plan(trainer)
        # The LR the optimizer step of this batch's window uses: the scheduler only
        # steps after on_train_batch_end of the window's last batch. The step this batch
        # trains for is the count of steps done before it (any layout, any accumulation).
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]
        self._step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        record = {
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "global_step": trainer.global_step,
            "step": self._step,
            "world_size": trainer.world_size,
            "lr": self._lr,
            "ids": batch[self.ids_field].tolist(),
        }
        path = Path(self.out_dir) / f"samples-rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` to the run's log directory (one file per rank in DDP).

    Works for any ``predict_step`` that returns a dict of equal-length 1-D tensors or
    lists (one column per key, e.g. ``index`` and ``prediction``). A dict with only a
    ``text`` list (generated text) goes to ``predictions.txt`` instead, one entry
    after another, for a person to read. Anything else is left to the user's own writer.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        batches = [batch for batch in predictions if isinstance(batch, dict)]
        if not batches or len(batches) != len(predictions):
            return
        columns = list(batches[0])
        suffix = "" if trainer.world_size == 1 else f"-rank{trainer.global_rank}"
        as_text = columns == ["text"]
        path = Path(trainer.log_dir or ".") / f"predictions{suffix}.{'txt' if as_text else 'csv'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if as_text:
            entries = [text for batch in batches for text in batch["text"]]
            rule = "\n" + "-" * 72 + "\n"
            path.write_text(rule.join(entries) + "\n")
            rank_zero_info(f"predictions written to {path}")
            return
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for batch in batches:
                values = [_as_list(batch[column]) for column in columns]
                writer.writerows(zip(*values, strict=True))
        rank_zero_info(f"predictions written to {path}")


def _as_list(value: Any) -> list:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)
