"""How close to the hardware a run is: the FLOPs of a training batch and the device's peak.

``BatchFlops`` gives the FLOPs one training batch costs on this rank: the module's own
``flops_per_batch`` when it states one, else counted once, on the first batch of a
launch, by torch's ``FlopCounterMode`` while that batch runs for real (forward, backward
and optimizer step as executed: any module, any strategy, no copy of the model; every
matmul, convolution and attention op is counted, elementwise ops are not, as in the MFU
papers). A module whose FLOPs cannot be counted gets one line saying why, never a crash.

``peak_flops_per_sec`` is the device's peak for the run's compute dtype, from Lightning's
table (A100, H100, H200, L4, ...; bf16 for ``bf16-mixed``, tf32/fp32 for ``32-true``), or
the value a config states; None on a CPU or a device the table does not know. MFU is
FLOP/s over that peak.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


class BatchFlops:
    """The FLOPs of one training batch on this rank (``per_batch``; None until known)."""

    def __init__(self) -> None:
        self.per_batch: float | None = None
        self._counter: Any = None
        self._settled = False

    def start(self, pl_module: pl.LightningModule) -> None:
        """At a batch's start: take the module's stated FLOPs, or count this batch's."""
        if self._settled:
            return
        stated = getattr(pl_module, "flops_per_batch", None)
        if stated:
            self.per_batch, self._settled = float(stated), True
            return
        from torch.utils.flop_counter import FlopCounterMode

        try:
            counter = FlopCounterMode(display=False)
            counter.__enter__()
        except Exception as error:  # noqa: BLE001 - any reason is reported, never raised
            self._give_up(f"{type(error).__name__}: {error}")
            return
        self._counter = counter

    def stop(self) -> None:
        """At the batch's end: what the counted batch cost."""
        counter, self._counter = self._counter, None
        if counter is None:
            return
        counter.__exit__(None, None, None)
        self._settled = True
        flops = counter.get_total_flops()
        if flops > 0:
            self.per_batch = float(flops)
        else:
            self._give_up("no matmul, convolution or attention op ran in a training batch")

    def abandon(self) -> None:
        """The batch raised: leave torch's dispatch mode, count nothing."""
        counter, self._counter = self._counter, None
        if counter is not None:
            counter.__exit__(None, None, None)

    def _give_up(self, why: str) -> None:
        self._settled = True
        rank_zero_info(
            f"FLOP/s and MFU are not shown: the FLOPs of a training batch could not be "
            f"counted ({why}); give the module a flops_per_batch attribute to state them"
        )


def peak_flops_per_sec(trainer: pl.Trainer, stated: float | None = None) -> float | None:
    """The device's peak FLOP/s in the run's compute dtype; ``stated`` wins; None: unknown."""
    if stated:
        return float(stated)
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None  # Lightning's table has GPUs (and TPUs) only
    from lightning.fabric.utilities.throughput import get_available_flops

    from train_template.seam.precision import compute_dtype

    peak = get_available_flops(device, compute_dtype(trainer))
    return float(peak) if peak else None
