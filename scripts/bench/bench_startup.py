"""Time from process start to the first optimizer step of `train.py fit`, vs the bare import
of the libraries it needs (the floor any Lightning entry point pays).

    .venv/bin/python scripts/bench/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, bench_args, interleave, machine, table

IMPORTS = "import lightning.pytorch, litdata, torchmetrics, jsonargparse"


def bare_import() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True)
    return time.perf_counter() - start


def first_step(data_dir: Path, tmp: Path, counter: list[int]) -> float:
    counter[0] += 1
    run_dir = tmp / f"run{counter[0]}"
    overlay = tmp / f"audit{counter[0]}.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: train_template.callbacks.SampleIdRecorder\n"
        f"      init_args: {{out_dir: {run_dir / 'samples'}}}\n"
    )
    marker = run_dir / "samples" / "samples-rank0.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train.py"),
            "fit",
            "--config",
            str(REPO / "configs/default.yaml"),
            "--config",
            str(overlay),
            "--data.data_dir",
            str(data_dir),
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.enable_progress_bar",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not marker.exists():  # written right after the first optimizer step
        if proc.poll() is not None:
            raise RuntimeError("train.py ended before its first step")
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    proc.kill()
    proc.wait()
    return elapsed


def main() -> None:
    args = bench_args(__doc__)
    from examples.digits.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "digits"
        prepare("digits", data_dir, num_workers=0, log=lambda *_: None)
        counter = [0]
        results = interleave(
            {
                "bare import": bare_import,
                "train.py fit -> first step": lambda: first_step(data_dir, Path(tmp), counter),
            },
            args.repeats,
        )
    print(f"# Start-up\n\n{machine()}\n")
    print(table("seconds from process start", results, "s", "bare import"))
    import statistics

    extra = statistics.median(results["train.py fit -> first step"]) - statistics.median(
        results["bare import"]
    )
    print(f"\ntemplate start-up beyond the imports: {extra:.2f} s (target <= 2 s)")


if __name__ == "__main__":
    main()
