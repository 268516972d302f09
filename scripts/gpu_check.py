"""The GPU checks in one table (run by scripts/gpu_check.sh on a machine with an NVIDIA GPU).

Each row is a real run: the GPU-marked tests; fit of each shipped example on the GPU in
bf16; DDP through NCCL (strategy ddp, one device); FSDP2 (configs/lm.yaml +
configs/fsdp.yaml, NCCL, bf16, sharded checkpoints) on one device; a SIGKILL after a
mid-epoch checkpoint and a resume, compared with an uninterrupted run (Lightning's
``deterministic`` on), for the digits (a file checkpoint) and the sharded LM (a
distributed-checkpoint folder), which is then exported to safetensors; the per-step
benchmark (template vs raw loop, bf16).
Output of every run goes to ``bench_out/gpu_check/<row>.log``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench_out" / "gpu_check"
PYTHON = sys.executable


def fit_cmd(run_dir: Path, config: str | list[str], *extra: str) -> list[str]:
    configs = [config] if isinstance(config, str) else config
    return [
        PYTHON,
        str(REPO / "train.py"),
        "fit",
        *(arg for name in configs for arg in ("--config", f"configs/{name}.yaml")),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def step(name: str, cmd: list[str], timeout: int = 900) -> tuple[str, float, str]:
    start = time.perf_counter()
    log = OUT / f"{name}.log"
    with log.open("w") as handle:
        try:
            code = subprocess.run(
                cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    seconds = time.perf_counter() - start
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    return ("ok" if code == 0 else f"FAILED ({code})"), seconds, tail[0][:90]


def kill_and_resume(
    name: str, config: str | list[str], extra: list[str], kill_at: int
) -> tuple[str, float, str]:
    """An uninterrupted run, and one SIGKILLed once last.ckpt reaches ``kill_at`` and
    resumed with --ckpt_path last; their final weights compared (files or sharded folders)."""
    import torch

    from train_template.checkpoint_files import checkpoint_progress
    from train_template.export import weights_of

    start = time.perf_counter()
    reference, resumed = OUT / "runs" / f"{name}-reference", OUT / "runs" / f"{name}-resumed"
    for path in (reference, resumed):
        subprocess.run(["rm", "-rf", str(path)])
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    subprocess.run(
        fit_cmd(reference, config, *extra), cwd=REPO, env=env, check=True, capture_output=True
    )
    proc = subprocess.Popen(
        fit_cmd(resumed, config, *extra),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = resumed / "checkpoints" / "last.ckpt"
    step_at = -1
    while step_at < kill_at and proc.poll() is None:
        time.sleep(0.01)
        progress = checkpoint_progress(str(last))
        step_at = -1 if progress is None else progress[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(
        fit_cmd(resumed, config, *extra, "--ckpt_path", "last"),
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    (a, step_a), (b, step_b) = (
        weights_of(str(reference / "checkpoints" / "last.ckpt")),
        weights_of(str(last)),
    )
    diffs = [(a[k].float() - b[k].float()).abs().max().item() for k in a]
    equal = all(torch.equal(a[k], b[k]) for k in a)
    detail = "bitwise equal" if equal else f"max |diff| {max(diffs):.3g}"
    status = "ok" if step_a == step_b else "FAILED"
    return status, time.perf_counter() - start, f"killed at step {step_at}; {detail}"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    gpu = [
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "bf16-mixed",
    ]
    runs = OUT / "runs"
    rows = [
        (
            "GPU-marked tests",
            step("gpu-tests", [PYTHON, "-m", "pytest", "-q", "-m", "gpu", "tests"]),
        ),
        ("fit digits, bf16", step("fit-digits", fit_cmd(runs / "digits", "default", *gpu))),
        (
            "fit lm, bf16 (2M tokens)",
            step("fit-lm", fit_cmd(runs / "lm", "lm", *gpu, "--plan.max_tokens", "2000000")),
        ),
        (
            "DDP via NCCL, 1 device",
            step(
                "ddp-nccl",
                fit_cmd(runs / "ddp", "ddp", "--trainer.devices", "1", "--trainer.max_epochs", "3"),
            ),
        ),
        (
            "FSDP2 lm, bf16, NCCL, 1 device",
            step(
                "fsdp2",
                fit_cmd(runs / "fsdp2", ["lm", "fsdp"], *gpu, "--plan.max_tokens", "500000"),
            ),
        ),
        (
            "export the sharded checkpoint",
            step(
                "export",
                [
                    PYTHON,
                    "train.py",
                    "export",
                    "--ckpt_path",
                    str(runs / "fsdp2/checkpoints/last.ckpt"),
                ],
            ),
        ),
        (
            "SIGKILL + resume (deterministic)",
            kill_and_resume(
                "digits",
                "default",
                [
                    *gpu,
                    "--trainer.deterministic",
                    "true",
                    "--trainer.max_epochs",
                    "4",
                    "--checkpoint.every_n_train_steps",
                    "20",
                ],
                kill_at=60,
            ),
        ),
        (
            "SIGKILL + sharded resume, FSDP2",
            kill_and_resume(
                "fsdp2",
                ["lm", "fsdp"],
                [
                    *gpu,
                    "--trainer.deterministic",
                    "true",
                    "--plan.max_tokens",
                    "300000",
                    "--checkpoint.every_n_train_steps",
                    "50",
                ],
                kill_at=100,
            ),
        ),
        (
            "per-step benchmark, bf16",
            step(
                "bench-step",
                [
                    PYTHON,
                    "scripts/bench/bench_step.py",
                    "--accelerator",
                    "gpu",
                    "--precision",
                    "bf16-mixed",
                    "--repeats",
                    "3",
                ],
            ),
        ),
    ]
    print(f"\n{'check':<34} {'result':<12} {'seconds':>8}  detail")
    for name, (status, seconds, detail) in rows:
        print(f"{name:<34} {status:<12} {seconds:8.1f}  {detail}")
    print(f"\nlogs: {OUT}")
    bench = OUT / "bench-step.log"
    if bench.exists():
        print("\n" + bench.read_text())
    return 0 if all(r[1][0] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
