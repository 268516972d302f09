"""What a person reads of a run: the plan table, ``plan.json`` and ``training.png``.

``training.png`` is drawn from the run's ``metrics.csv`` files.

Four panels: training loss per step, learning rate per step, validation metrics, and
throughput; the plan's numbers in the title. It reads every ``version_*/metrics.csv`` of
the run (a resumed run continues in a new version folder; for a step logged twice the
later launch wins), so a resumed run is drawn whole, and it takes any column names a
module logs: a column counts as training loss when its name starts with ``train`` and
contains ``loss``, as validation when it starts with ``val``, as throughput when it ends
with ``_per_sec`` (FLOP/s and MFU on a second axis of that panel), as learning rate when
it starts with ``lr-``. ``train.py plan
--lr_curve`` draws its curve with the same :func:`draw_lr`.
"""

from __future__ import annotations

import csv
import posixpath
from pathlib import Path
from typing import Any

from train_template import storage

PLOT_FILE = "training.png"
PLAN_FILE = "plan.json"


def read_metrics(log_root: Path) -> dict[str, dict[int, float]]:
    """column -> {step: value} over every launch of the run, later launches winning."""
    columns: dict[str, dict[int, float]] = {}
    versions = sorted(
        (p for p in log_root.glob("version_*") if p.name.removeprefix("version_").isdigit()),
        key=lambda p: int(p.name.removeprefix("version_")),
    )
    for version in versions:
        path = version / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if not row.get("step"):
                    continue
                step = int(float(row["step"]))
                for name, value in row.items():
                    if name not in ("step", "epoch") and value not in ("", None):
                        columns.setdefault(name, {})[step] = float(value)
    return columns


def draw_lr(axes: Any, steps: list[int], learning_rates: list[float], boundaries=()) -> None:
    """The LR per optimizer step (1-based on the axis), epoch boundaries as thin lines."""
    axes.plot(steps, learning_rates)
    for boundary in boundaries:
        axes.axvline(boundary + 0.5, color="0.85", linewidth=0.8)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")


def plot_run(log_root: Path, out: Path, plan: Any = None) -> Path | None:
    """Draw ``out`` from the run's metrics; None when nothing was logged."""
    columns = read_metrics(log_root)
    if not columns:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {
        "training loss": [c for c in columns if c.startswith("train") and "loss" in c],
        "learning rate": [c for c in columns if c.startswith("lr-")],
        "validation": [c for c in columns if c.startswith("val")],
        "throughput (per second)": [
            c for c in columns if c.endswith("_per_sec") and "flops" not in c
        ],
    }
    # FLOP/s and MFU share the throughput panel on their own axis (MFU where known).
    hardware = [c for c in columns if c.endswith("mfu")] or [
        c for c in columns if c.endswith("flops_per_sec")
    ]
    figure, grid = plt.subplots(2, 2, figsize=(11, 7))
    for axes, (title, names) in zip(grid.flat, groups.items(), strict=True):
        axes.set_title(title, fontsize=10)
        if not names:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", color="0.5")
            axes.set_xticks([])
            axes.set_yticks([])
            continue
        for name in names:
            points = sorted(columns[name].items())
            steps, values = [s + 1 for s, _ in points], [v for _, v in points]
            if title == "learning rate":
                boundaries = _epoch_boundaries(plan)
                draw_lr(axes, steps, values, boundaries)
                axes.set_ylabel(name)
            else:
                axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
                axes.set_xlabel("optimizer step")
        if title != "learning rate":
            axes.legend(fontsize=8, loc="upper left")
        if title.startswith("throughput") and hardware:
            twin = axes.twinx()
            for name in hardware:
                points = sorted(columns[name].items())
                twin.plot([s + 1 for s, _ in points], [v for _, v in points], "--", label=name)
            twin.legend(fontsize=8, loc="lower right")
    figure.suptitle(_title(plan), fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _epoch_boundaries(plan: Any) -> list[int]:
    if plan is None or not plan.steps_per_epoch:
        return []
    return [epoch * plan.steps_per_epoch for epoch in range(1, plan.epochs or 0)]


def _title(plan: Any) -> str:
    if plan is None:
        return "training run"
    epochs = plan.epochs if plan.epochs else "unknown"
    return (
        f"{plan.max_steps} optimizer steps (length from {plan.length_from}), epochs {epochs}, "
        f"world size {plan.world_size}, global batch {plan.global_batch_size} "
        f"({plan.batch_size} x {plan.accumulate_grad_batches} x {plan.world_size}), "
        f"warmup {plan.warmup_steps}"
    )


def format_plan(plan: Any, planned_schedule: bool = True) -> str:
    """The table printed on rank 0 when fit starts and by the dry run. Warmup is shown
    only when the module's scheduler is the template's planned one (``planned_schedule``);
    any other scheduler decides its own warmup."""
    rows = [
        ("world size", f"{plan.world_size} ({plan.num_nodes} node(s) x {plan.devices} device(s))"),
        ("batch size per device", plan.batch_size),
        ("accumulate grad batches", plan.accumulate_grad_batches),
        ("global batch size", plan.global_batch_size),
        ("batches per epoch (per rank)", _known(plan.batches_per_epoch)),
        ("samples per epoch (all ranks)", _known(plan.samples_per_epoch)),
        ("optimizer steps per epoch", _known(plan.steps_per_epoch)),
        ("epochs", _known(plan.epochs)),
        ("max steps", f"{plan.max_steps} (length from {plan.length_from})"),
        (
            "warmup steps",
            plan.warmup_steps if planned_schedule else "set by the module's scheduler",
        ),
        ("sample order", sample_order(plan.data_order)),
    ]
    if plan.tokens_per_sample is not None:
        rows += [
            ("tokens per sample", plan.tokens_per_sample),
            ("tokens per optimizer step", plan.global_tokens_per_step),
            ("tokens in the run", plan.max_steps * plan.global_tokens_per_step),
        ]
    width = max(len(name) for name, _ in rows)
    lines = ["Training plan", "-" * (width + 24)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def sample_order(data_order: dict) -> str:
    """The plan's sample order in words (``order.py``; ``--plan.shuffle_*``)."""
    if not data_order.get("global_order"):
        return "the train loader's own (same-layout resume only)"
    if not data_order.get("shuffle", True):
        return "global, in index order"
    window, block = data_order.get("shuffle_window"), data_order.get("shuffle_block")
    if window is None:
        return "global, one permutation of all samples"
    blocks = "chunks" if block == "chunks" else f"blocks of {block} indices"
    return f"global, shuffled in windows of {window} {blocks}"


def _known(value: int | None) -> int | str:
    return "unknown (a stream without a length)" if value is None else value


def draw_training_plot(trainer: Any, log_dir: str, plan: Any) -> None:
    """``training.png`` from the CSV logger's files (none without a CSV logger); in
    object storage the run's ``metrics.csv`` files are read into a local folder first."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_info

    csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    if not csv_loggers:
        return
    for logger in trainer.loggers:
        logger.save()  # the rows still in memory
    log_root = posixpath.dirname(str(csv_loggers[0].log_dir).rstrip("/"))
    target = storage.join(log_dir, PLOT_FILE)
    with (
        storage.local_copy(log_root, "*/metrics.csv") as local_root,
        storage.local_file(target) as out,
    ):
        drawn = plot_run(Path(local_root), out, plan)
    if drawn is not None:
        rank_zero_info(f"training plot: {target}")


def write_plan(plan: Any, log_dir: str) -> None:
    """``<log_dir>/plan.json``: the plan a fit trains by (local or object storage)."""
    storage.write_text(storage.join(log_dir, PLAN_FILE), plan.to_json())
