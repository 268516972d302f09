"""Kill soak: runs SIGKILLed at random moments and relaunched with ``--ckpt_path auto``
until they finish, each compared with an uninterrupted run (weights bitwise, global step).

Every launch is the real CLI in its own process group; the kill lands anywhere: during
start-up, mid-step, mid-checkpoint-write, in validation. Mid-epoch checkpoints and
gradient accumulation are on. Prints one line per run and a summary table.

    .venv/bin/python scripts/soak_kill.py --runs 6                  # world size 1
    .venv/bin/python scripts/soak_kill.py --runs 4 --world-size 2   # 2 gloo processes
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def fit_cmd(run_dir: Path, data_dir: Path, world_size: int, *extra: str) -> list[str]:
    config = "default" if world_size == 1 else "ddp"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--config",
        f"configs/{config}.yaml",
        "--data.data_dir",
        str(data_dir),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.max_epochs",
        "3",
        "--trainer.accumulate_grad_batches",
        "3",
        "--checkpoint.every_n_train_steps",
        "4",
        "--data.batch_size",
        "16",
        *extra,
    ]
    if world_size > 1:
        cmd += ["--trainer.accelerator", "cpu", "--trainer.devices", str(world_size)]
    return cmd


def weights(run_dir: Path):
    import torch

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


def soak_one(
    reference: Path,
    run_dir: Path,
    data_dir: Path,
    world_size: int,
    rng: random.Random,
    max_wait: float,
) -> tuple[int, bool, int]:
    """Kill and relaunch until the run finishes; (kills, bitwise equal, global step)."""
    import torch

    kills = 0
    while True:
        proc = subprocess.Popen(
            fit_cmd(run_dir, data_dir, world_size, "--ckpt_path", "auto"),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=rng.uniform(1.0, max_wait))
            if proc.returncode != 0:
                raise RuntimeError(f"relaunch failed ({proc.returncode}): {err[-2000:]}")
            break  # finished by itself
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    ref_step, ref_weights = weights(reference)
    step, state = weights(run_dir)
    equal = step == ref_step and all(torch.equal(t, state[k]) for k, t in ref_weights.items())
    return kills, equal, step


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument(
        "--max-wait", type=float, default=14.0, help="longest time before a kill (s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from examples.digits.prepare import prepare
    from train_template.quiet import silence_known_messages

    silence_known_messages()
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    data_dir = root / "digits"
    prepare("digits", data_dir, num_workers=0, log=lambda *_: None)
    reference = root / "reference"
    subprocess.run(
        fit_cmd(reference, data_dir, args.world_size), cwd=REPO, check=True, capture_output=True
    )
    rng = random.Random(args.seed)
    results = []
    start = time.perf_counter()
    for index in range(args.runs):
        run_dir = root / f"run{index}"
        kills, equal, step = soak_one(
            reference, run_dir, data_dir, args.world_size, rng, args.max_wait
        )
        results.append((kills, equal))
        print(
            f"run {index}: {kills} kill(s), global step {step}, bitwise equal: {equal}", flush=True
        )
        shutil.rmtree(run_dir)
    total_kills = sum(k for k, _ in results)
    identical = sum(e for _, e in results)
    print(
        f"\nworld size {args.world_size}: {args.runs} runs, {total_kills} kills, "
        f"{identical}/{args.runs} bitwise identical to the uninterrupted run "
        f"({time.perf_counter() - start:.0f} s)"
    )
    shutil.rmtree(root)
    return 0 if identical == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
