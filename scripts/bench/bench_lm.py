"""Language model, side by side: ``configs/lm.yaml`` through the template vs a raw PyTorch
loop over the same model, data, optimizer, LR schedule and token budget.

Both train on the stdlib token shards (data/stdlib, built if missing) and are then
evaluated on the same held-out files (val/loss, nats per byte). Throughput is training
tokens per second of wall time inside the training loop. Run sequentially, on the same
machine, in one invocation.

    .venv/bin/python scripts/bench/bench_lm.py                 # the budget of configs/lm.yaml
    .venv/bin/python scripts/bench/bench_lm.py --tokens 2000000
    .venv/bin/python scripts/bench/bench_lm.py --compile   # + the template with torch.compile
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import REPO, machine

from examples.lm.data import TokenDataModule  # noqa: E402
from examples.lm.network import TinyTransformer  # noqa: E402
from train_template.options import LRSchedule  # noqa: E402
from train_template.order import GlobalOrderSampler  # noqa: E402
from train_template.order_loader import loader_order  # noqa: E402
from train_template.schedule import PlannedLRLambda  # noqa: E402
from train_template.seam.loop import loader_with_sampler  # noqa: E402


def lm_config() -> dict:
    """The settings of configs/lm.yaml the raw loop copies (model, optimizer, schedule, data)."""
    import yaml

    configs = REPO / "configs"
    launch = yaml.safe_load((configs / "lm.yaml").read_text())
    model = yaml.safe_load((configs / "lm" / "model.yaml").read_text())["init_args"]
    data = yaml.safe_load((configs / "lm" / "data.yaml").read_text())["init_args"]
    return {
        "network": model["network"]["init_args"],
        "optimizer": model["optimizer"]["init_args"],
        "schedule": launch["lr_schedule"],
        "data": {k: data[k] for k in ("context", "batch_size", "drop_last", "seed")},
        "max_tokens": launch["plan"]["max_tokens"],
    }


def raw_loop(max_tokens: int, config: dict) -> dict:
    seed = config["data"]["seed"]
    torch.manual_seed(seed)
    data = TokenDataModule(**config["data"])
    data.prepare_data()
    data.setup("fit")
    # The template's order (the global order at one process): the same samples per step.
    items = data.train_dataloader()
    order = loader_order(items).global_order(world_size=1, accumulate_grad_batches=1)
    sampler = GlobalOrderSampler(order, 1, 0, config["data"]["batch_size"])
    loader = loader_with_sampler(items, sampler)
    network = TinyTransformer(**config["network"])
    optimizer = torch.optim.AdamW(network.parameters(), **config["optimizer"])
    batch, context = config["data"]["batch_size"], config["data"]["context"]
    tokens_per_step = batch * context
    max_steps = math.ceil(math.ceil(max_tokens / context) / batch)
    schedule = LRSchedule(**config["schedule"])
    warmup = schedule.warmup.to_steps(max_steps, steps_per_epoch=len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, PlannedLRLambda(schedule, warmup, max_steps)
    )
    step, epoch, start = 0, 0, time.perf_counter()
    network.train()
    while step < max_steps:
        sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            batch = batch.long()
            logits = network(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == max_steps:
                break
    seconds = time.perf_counter() - start
    return {
        "steps": max_steps,
        "train_seconds": seconds,
        "tokens_per_sec": max_steps * tokens_per_step / seconds,
        "val_loss": evaluate(network, data),
    }


@torch.no_grad()
def evaluate(network, data: TokenDataModule) -> float:
    network.eval()
    total, count = 0.0, 0
    for batch in data.val_dataloader():
        batch = batch.long()
        logits = network(batch[:, :-1])
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    return total / count


def template(max_tokens: int, compile: bool = False) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-lm-"))
    common = [
        "--config",
        "configs/lm.yaml",
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
    ]
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "train.py",
            "fit",
            *common,
            "--plan.max_tokens",
            str(max_tokens),
            "--model.init_args.compile",
            str(compile).lower(),
        ],  # fmt: skip
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    subprocess.run(
        [sys.executable, "train.py", "validate", *common, "--ckpt_path", "last"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    fit_log, validate_log = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    val_loss = next(
        float(r["val/loss"]) for r in csv.DictReader(validate_log.open()) if r.get("val/loss")
    )
    rows = list(csv.DictReader(fit_log.open()))
    key = "train/device/items_per_sec"  # ThroughputMonitor, this rank (world size 1 here)
    rates = [float(r[key]) for r in rows if r.get(key)]
    steps = max(int(r["step"]) for r in rows if r.get("lr-AdamW")) + 1
    return {
        "steps": steps,
        "train_seconds": wall,
        "tokens_per_sec": sorted(rates)[len(rates) // 2],
        "val_loss": val_loss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--tokens", type=int, default=None, help="token budget of both runs (default: lm.yaml's)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also the template with torch.compile (blocks)"
    )
    args = parser.parse_args()
    config = lm_config()
    tokens = args.tokens or config["max_tokens"]
    print(machine())
    raw = raw_loop(tokens, config)
    print(f"  raw loop done: {raw}", file=sys.stderr, flush=True)
    ours = template(tokens)
    print(f"  template done: {ours}", file=sys.stderr, flush=True)
    rows = [("raw PyTorch loop", raw), ("template (lm.yaml)", ours)]
    if args.compile:
        compiled = template(tokens, compile=True)
        print(f"  compiled done: {compiled}", file=sys.stderr, flush=True)
        rows.append(("template, compiled", compiled))
    shape = ", ".join(f"{k} {v}" for k, v in config["network"].items())
    print(f"\nLanguage model, {tokens:,} tokens, batch {config['data']['batch_size']}, {shape}")
    print(f"{'':<22}{'steps':>7}{'tokens/s':>11}{'val/loss (nats/byte)':>23}")
    for name, result in rows:
        print(
            f"{name:<22}{result['steps']:>7}{result['tokens_per_sec']:>11.0f}{result['val_loss']:>23.4f}"
        )
    print(f"\ntemplate / raw throughput: {ours['tokens_per_sec'] / raw['tokens_per_sec']:.3f}x")
    print(f"val/loss difference: {abs(ours['val_loss'] - raw['val_loss']):.4f} nats/byte")
    print(f"template fit wall time (incl. start-up and validation): {ours['train_seconds']:.0f} s")
    if args.compile:
        speedup = compiled["tokens_per_sec"] / ours["tokens_per_sec"]
        print(f"compiled / eager template throughput: {speedup:.3f}x")
        print(f"compiled fit wall time (incl. compilation): {compiled['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
