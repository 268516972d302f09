"""Lightning's precision plugins: the dtype a run computes its matmuls in.

Pinned: lightning 2.6.6. ``_plugin_to_compute_dtype``
(pytorch/callbacks/throughput_monitor.py) is the mapping Lightning's own
``ThroughputMonitor`` uses to pick a device's peak FLOPs (bf16-mixed -> bfloat16,
32-true -> float32, ...); no public function says it.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def compute_dtype(trainer: pl.Trainer) -> torch.dtype:
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    return _plugin_to_compute_dtype(trainer.precision_plugin)
