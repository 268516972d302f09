"""The GPU checks in one table (run by scripts/gpu_check.sh on a machine with an NVIDIA GPU).

Each row is a real run: the GPU-marked tests; fit of each shipped example on the GPU in
bf16; DDP through NCCL (strategy ddp, one device) and FSDP on one device; a SIGKILL
after a mid-epoch checkpoint and a resume, compared with an uninterrupted run
(Lightning's ``deterministic`` on); the per-step benchmark (template vs raw loop, bf16).
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


def fit_cmd(run_dir: Path, config: str, *extra: str) -> list[str]:
    return [
        PYTHON,
        str(REPO / "train.py"),
        "fit",
        "--config",
        f"configs/{config}.yaml",
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


def kill_and_resume() -> tuple[str, float, str]:
    import torch

    start = time.perf_counter()
    extra = [
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "bf16-mixed",
        "--trainer.deterministic",
        "true",
        "--trainer.max_epochs",
        "4",
        "--checkpoint.every_n_train_steps",
        "20",
    ]
    reference, resumed = OUT / "runs" / "reference", OUT / "runs" / "resumed"
    for path in (reference, resumed):
        subprocess.run(["rm", "-rf", str(path)])
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    subprocess.run(
        fit_cmd(reference, "default", *extra), cwd=REPO, env=env, check=True, capture_output=True
    )
    proc = subprocess.Popen(
        fit_cmd(resumed, "default", *extra),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = resumed / "checkpoints" / "last.ckpt"
    step_at = -1
    while step_at < 60 and proc.poll() is None:
        time.sleep(0.01)
        try:
            step_at = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
        except Exception:  # noqa: BLE001 - not written yet
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(
        fit_cmd(resumed, "default", *extra, "--ckpt_path", "last"),
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    b = torch.load(last, weights_only=True, map_location="cpu")
    diffs = [
        (a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item()
        for k in a["state_dict"]
    ]
    equal = all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    detail = "bitwise equal" if equal else f"max |diff| {max(diffs):.3g}"
    status = "ok" if a["global_step"] == b["global_step"] else "FAILED"
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
            "FSDP, 1 device",
            step(
                "fsdp",
                fit_cmd(
                    runs / "fsdp", "fsdp", "--trainer.devices", "1", "--trainer.max_epochs", "3"
                ),
            ),
        ),
        ("SIGKILL + resume (deterministic)", kill_and_resume()),
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
