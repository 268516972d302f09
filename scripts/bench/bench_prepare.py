"""Data preparation throughput: `litdata.optimize` workers (what scripts/prepare_data.py
runs with --num-workers >= 1) vs the in-process writer (--num-workers 0), same samples.

    .venv/bin/python scripts/bench/bench_prepare.py [--samples 50000] [--repeats 5]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import bench_args, interleave, machine, synthetic_source, table

from examples.digits.prepare import prepare


def samples_per_second(source: Path, out: Path, workers: int, num_samples: int) -> float:
    start = time.perf_counter()
    prepare(str(source), out, num_workers=workers, force=True, log=lambda *_: None)
    return num_samples / (time.perf_counter() - start)


def main() -> None:
    args = bench_args(__doc__, 50_000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = synthetic_source(tmp / "synthetic.npz", args.samples)
        mb = source.stat().st_size / 1e6
        results = interleave(
            {
                "in-process writer (workers 0)": lambda: samples_per_second(
                    source, tmp / "w0", 0, args.samples
                ),
                "litdata.optimize, 1 worker": lambda: samples_per_second(
                    source, tmp / "w1", 1, args.samples
                ),
                "litdata.optimize, 2 workers": lambda: samples_per_second(
                    source, tmp / "w2", 2, args.samples
                ),
            },
            args.repeats,
        )
    print(
        f"# Preparation throughput\n\n{machine()}\n\n{args.samples} samples of 3x32x32 uint8 ({mb:.0f} MB)\n"
    )
    print(
        table(
            "samples/s written (load, split, shard)",
            results,
            "samples/s",
            "in-process writer (workers 0)",
            lower_is_better=False,
        )
    )


if __name__ == "__main__":
    main()
