"""The global order's cost and quality at any size: the blockwise shuffle (the default,
``--plan.shuffle_window 64``) against one permutation of all samples (``null``, the order
before windows), in one run.

1. Arithmetic, no data: peak memory and seconds to one rank's first micro-batch (rank 5
   of 8, batch 32, fresh at step 0 and resumed at the epoch's last step) at 1e6, 1e8 and
   1e9 samples; numpy's allocations traced (``tracemalloc``).
2. Fits through ``train.py`` (``configs/default.yaml``, a map-style module whose items
   are made from their index, ``scripts/bench/index_data.py``): 20 steps, peak RSS and
   wall time of the process.
3. Shuffle quality over real litdata shards whose chunks each hold one class (the worst
   case for any chunk-local order: 100 items a chunk, labels sorted): distinct chunks and
   the largest class's share per global batch of 256, and how often neighbours share a
   label, for both orders, narrower windows and litdata's own stream.

    .venv/bin/python scripts/bench/bench_order.py [--sizes 1e6,1e8,1e9] [--fit-sizes 1e7,1e9]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from common import REPO, machine

from train_template.order import GlobalOrder

ORDERS = {"one permutation (null)": None, "blockwise (window 64)": 64}
GLOBAL_BATCH, WORLD, BATCH, RANK = 256, 8, 32, 5


def first_batch(num_samples: int, window: int | None, resumed: bool) -> tuple[float, int]:
    """(seconds, peak bytes) to rank 5's first micro-batch, from a fresh order object."""
    tracemalloc.start()
    start = time.perf_counter()
    order = GlobalOrder(num_samples, GLOBAL_BATCH, seed=0, shuffle_window=window)
    step = order.steps_per_epoch - 1 if resumed else 0
    batch = next(order.rank_batches(0, WORLD, RANK, BATCH, start_step=step))
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(batch) == BATCH
    return seconds, peak


def section(title: str, columns: list[str], sizes: list[int], row) -> list[str]:
    """A table of ``row(size, window)``'s cells for every size and both orders, each row
    printed to stderr as it is measured (the 1e9 permutation takes minutes)."""
    lines = [f"## {title}", "", f"| samples | order | {' | '.join(columns)} |"]
    lines.append("| ---: | --- |" + " ---: |" * len(columns))
    for size in sizes:
        for name, window in ORDERS.items():
            lines.append(f"| {size:.0e} | {name} | {' | '.join(row(size, window))} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def arithmetic(sizes: list[int]) -> list[str]:
    def row(size: int, window: int | None) -> list[str]:
        fresh, resumed = first_batch(size, window, False), first_batch(size, window, True)
        return [
            f"{fresh[0]:.3f}",
            f"{fresh[1] / 2**20:.1f}",
            f"{resumed[0]:.3f}",
            f"{resumed[1] / 2**20:.1f}",
        ]

    columns = ["fresh: s", "fresh: peak MB", "resumed at the last step: s", "resumed: peak MB"]
    return section("1. One rank's first micro-batch (arithmetic only)", columns, sizes, row)


MEASURE = (
    "import resource, subprocess, sys, time; start = time.perf_counter(); "
    "code = subprocess.run(sys.argv[1:]).returncode; "
    "print(code, time.perf_counter() - start, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)


def fit(num_samples: int, window: int | None, root: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a 20-step fit in its own process."""
    command = [
        sys.executable, "train.py", "fit", "--config", "configs/default.yaml",
        "--model", "plain_lightning.DocsStyleModule",
        "--data", "index_data.IndexDataModule", "--data.num_samples", str(num_samples),
        "--trainer.max_steps", "20", "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--checkpoint.monitor", "train_loss", "--checkpoint.mode", "min",
        "--plan.shuffle_window", "null" if window is None else str(window),
        "--trainer.default_root_dir", str(root / f"fit-{num_samples}-{window}"),
    ]  # fmt: skip
    env = {"PYTHONPATH": f"{REPO / 'tests'}:{REPO / 'scripts' / 'bench'}"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], cwd=REPO, capture_output=True, text=True,
        env={**__import__("os").environ, **env},
    )  # fmt: skip
    code, seconds, peak = result.stdout.split()[-3:]
    assert code == "0", result.stderr[-3000:]
    return float(seconds), int(peak)


def fits(sizes: list[int], root: Path) -> list[str]:
    def row(size: int, window: int | None) -> list[str]:
        seconds, peak = fit(size, window, root)
        return [f"{seconds:.1f}", f"{peak / 1e9:.2f}"]

    title = "2. A 20-step fit on one process (configs/default.yaml, items made from their index)"
    return section(title, ["wall s", "peak RSS GB"], sizes, row)


def class_sorted_shards(root: Path, num_samples: int, chunk_items: int) -> Path:
    """Shards of ``num_samples`` items (their index), ``chunk_items`` a chunk, the class of
    an item its chunk's rank in ten equal runs: each chunk holds one class."""
    from litdata.streaming.writer import BinaryWriter

    out = root / "sorted"
    writer = BinaryWriter(str(out), chunk_size=chunk_items)
    for index in range(num_samples):
        writer.add_item(index, {"index": index})
    writer.done()
    writer.merge()
    return out


def litdata_stream_order(shards: Path) -> np.ndarray:
    """The indices litdata's own shuffled stream yields over one epoch (one process)."""
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(shards), shuffle=True, seed=0)
    return np.array([item["index"] for item in dataset])


def quality(order: np.ndarray, chunk_of: np.ndarray, label_of: np.ndarray) -> tuple:
    batches = order[: len(order) // GLOBAL_BATCH * GLOBAL_BATCH].reshape(-1, GLOBAL_BATCH)
    chunks = np.mean([len(np.unique(chunk_of[b])) for b in batches])
    share = np.mean([np.bincount(label_of[b], minlength=10).max() / GLOBAL_BATCH for b in batches])
    neighbours = np.mean(label_of[order[1:]] == label_of[order[:-1]])
    return chunks, share, neighbours


def shuffle_quality(root: Path, num_samples: int = 100_000, chunk_items: int = 100) -> list[str]:
    shards = class_sorted_shards(root, num_samples, chunk_items)
    from litdata import StreamingDataset

    from train_template.seam.litdata import chunk_sizes

    sizes = chunk_sizes(StreamingDataset(str(shards)))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chunk_of = np.searchsorted(starts, np.arange(num_samples), side="right") - 1
    label_of = chunk_of * 10 // len(sizes)
    orders = {
        "one permutation (null)": GlobalOrder(num_samples, GLOBAL_BATCH, shuffle_window=None),
        **{
            f"blockwise (window {w})": GlobalOrder(
                num_samples, GLOBAL_BATCH, shuffle_window=w, block_sizes=sizes
            )
            for w in (64, 16, 4)
        },
    }
    lines = [
        f"## 3. Shuffle quality: {num_samples} items in {len(sizes)} chunks of one class each",
        "",
        "| order | distinct chunks per global batch of 256 | largest class's share of a batch | neighbours with the same class |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, order in orders.items():
        chunks, share, same = quality(order.epoch_order(0)[:num_samples], chunk_of, label_of)
        lines.append(f"| {name} | {chunks:.1f} | {share:.3f} | {same:.3f} |")
    chunks, share, same = quality(litdata_stream_order(shards), chunk_of, label_of)
    lines.append(f"| litdata's stream (shuffle=True) | {chunks:.1f} | {share:.3f} | {same:.3f} |")
    lines += [
        "",
        "(an i.i.d. shuffle: about 0.10 of neighbours share a class; a batch's largest class ~0.14)",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1e6,1e8,1e9")
    parser.add_argument("--fit-sizes", default="1e7,1e9")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    fit_sizes = [int(float(s)) for s in args.fit_sizes.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        lines = [f"# Global order ({machine()})", ""]
        lines += arithmetic(sizes) + [""]
        lines += fits(fit_sizes, Path(tmp)) + [""]
        lines += shuffle_quality(Path(tmp))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
