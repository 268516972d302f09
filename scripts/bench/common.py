"""Shared by the benchmarks: interleaved repetitions, medians, and the printed table."""

from __future__ import annotations

import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from train_template.quiet import silence_known_messages  # noqa: E402

silence_known_messages()


def bench_args(
    doc: str | None,
    samples: int | None = None,
    device: bool = False,
    flags: tuple = (),
    parse: bool = True,
):
    """--repeats (and --samples where the benchmark sizes its data, --accelerator and
    --precision where it can run on a GPU, and the benchmark's own on/off ``flags``:
    (name, help) pairs); the parser itself with ``parse=False``, for more options."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    if samples is not None:
        parser.add_argument("--samples", type=int, default=samples, help="synthetic samples")
    if device:
        parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
        parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    for name, help_text in flags:
        parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=help_text)
    return parser.parse_args() if parse else parser


def quiet_trainer(callbacks: list, root: str, logger=False, trainer_class=None, **overrides):
    """A 2-epoch CPU Trainer without validation, checkpointing, progress bar or summary:
    the set-up every timed fit here shares, so only the measured part differs. Its files
    (plan.json, logs) go under ``root``, the benchmark's own temporary folder."""
    import lightning.pytorch as pl

    settings = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_val_batches=0,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return (trainer_class or pl.Trainer)(**{**settings, **overrides}, callbacks=callbacks)


def interleave(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every case once per round, ``repeats`` rounds, so drift hits all cases alike
    (every other round in reverse order, so no case always follows the same one)."""
    results: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(repeats):
        names = list(cases) if round_index % 2 == 0 else list(cases)[::-1]
        for name in names:
            results[name].append(cases[name]())
        print(f"  round {round_index + 1}/{repeats} done", file=sys.stderr, flush=True)
    return results


def paired_ratio(results: dict[str, list[float]], case: str, baseline: str) -> float:
    """The median over rounds of ``case / baseline`` measured in the same round: on a
    machine whose speed drifts by more than the difference measured, the ratio of two
    neighbouring runs is steadier than the ratio of the medians."""
    pairs = zip(results[case], results[baseline], strict=True)
    return statistics.median(a / b for a, b in pairs)


def table(
    title: str,
    results: dict[str, list[float]],
    unit: str,
    baseline: str,
    lower_is_better: bool = True,
) -> str:
    base = statistics.median(results[baseline])
    lines = [
        f"## {title}",
        "",
        f"| case | median {unit} | min - max | ratio vs {baseline} |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, values in results.items():
        median = statistics.median(values)
        ratio = median / base
        lines.append(
            f"| {name} | {median:.4g} | {min(values):.4g} - {max(values):.4g} | {ratio:.3f}x |"
        )
    lines.append("")
    slower = "> 1" if lower_is_better else "< 1"
    lines.append(
        f"({len(next(iter(results.values())))} interleaved repetitions; "
        f"ratio {slower} means slower than {baseline})"
    )
    return "\n".join(lines)


def machine() -> str:
    import lightning
    import litdata
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, litdata {litdata.__version__}"
    )


def synthetic_source(
    path: Path, num_samples: int, side: int = 32, channels: int = 3, seed: int = 0
) -> Path:
    """A synthetic image-classification .npz big enough for loader numbers to mean something,
    fed through the same preparation path as real data (``examples.digits.prepare.prepare``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_samples, channels, side, side), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_samples)
    np.savez(path, images=images, labels=labels)
    return path
