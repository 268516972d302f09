"""Per-rank training state and checkpoint cost: DDP vs FSDP2, at 1, 2 and 4 processes.

The LM example's network scaled to ~60M parameters (``--width``/``--layers``), wrapped as
each strategy wraps it: torch's ``DistributedDataParallel`` (``configs/ddp.yaml``) or
``fully_shard`` per block and then the whole network (``LanguageModule.configure_model``
under ``configs/fsdp.yaml``). One AdamW step on a small batch, gloo processes, then per
rank: the bytes of parameters + gradients + optimizer state it holds, and the seconds and
bytes of a checkpoint save and load: a full file written by rank 0 (DDP, as Lightning
saves it, fsynced as the template's save does) vs each rank's own shard through
torch.distributed.checkpoint (what the template's FSDP2 checkpoints are; DCP fsyncs too). Baseline: DDP at the same world size, in the same run.

    .venv/bin/python scripts/bench/bench_sharding.py [--width 768 --layers 8 --sizes 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import machine

from examples.lm.network import TinyTransformer


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimizer state this rank holds (a DTensor: its shard)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in model.parameters():
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
    for state in optimizer.state.values():
        total += sum(local(v).numel() * v.element_size() for v in state.values() if v.dim())
    return total


def folder_bytes(path: Path, rank: int | None = None) -> int:
    files = [p for p in path.rglob("*") if p.is_file()]
    if rank is not None:
        files = [p for p in files if p.name.startswith(f"__{rank}_")]
    return sum(p.stat().st_size for p in files)


def worker(rank: int, world: int, strategy: str, args, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = TinyTransformer(context=128, width=args.width, layers=args.layers, heads=args.width // 64)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in net.blocks:
            fully_shard(block)
        model = fully_shard(net)
    else:
        model = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (2, 129))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
    optimizer.step()
    held = held_bytes(model, optimizer)
    target = out / f"{strategy}-{world}"
    dist.barrier()
    start = time.perf_counter()
    if strategy == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(target))
    elif rank == 0:  # as the template saves a file: written, then fsynced (atomic_save.py)
        with open(f"{target}.pt", "wb") as handle:
            torch.save({"model": net.state_dict(), "optim": optimizer.state_dict()}, handle)
            os.fsync(handle.fileno())
    saved = time.perf_counter() - start
    dist.barrier()
    start = time.perf_counter()
    if strategy == "fsdp2":
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(target))
    else:
        torch.load(f"{target}.pt", weights_only=True, map_location="cpu")  # every rank reads it
    loaded = time.perf_counter() - start
    dist.barrier()
    written = (
        folder_bytes(target, rank)
        if strategy == "fsdp2"
        else (os.path.getsize(f"{target}.pt") if rank == 0 else 0)
    )
    (out / f"{strategy}-{world}-rank{rank}.txt").write_text(f"{held} {saved} {loaded} {written}")
    dist.destroy_process_group()


def measure(strategy: str, world: int, args, out: Path) -> dict[str, float]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, strategy, args, port, out), nprocs=world, join=True)
    rows = [
        list(map(float, (out / f"{strategy}-{world}-rank{r}.txt").read_text().split()))
        for r in range(world)
    ]
    return {
        "held": max(r[0] for r in rows),
        "save": max(r[1] for r in rows),
        "load": max(r[2] for r in rows),
        "written": max(r[3] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    network = TinyTransformer(width=args.width, layers=args.layers, heads=args.width // 64)
    params = sum(p.numel() for p in network.parameters())
    print(machine())
    print(f"LM network: width {args.width}, {args.layers} blocks, {params / 1e6:.1f}M parameters")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for world in args.sizes:
            ddp = measure("ddp", world, args, Path(scratch))
            fsdp = measure("fsdp2", world, args, Path(scratch))
            for name, result in (("ddp", ddp), ("fsdp2", fsdp)):
                rows.append([
                    f"{name} x{world}",
                    f"{result['held'] / 2**20:.0f}",
                    f"{result['held'] / ddp['held']:.3f} (goal <= {1.2 / world:.3f})" if name == "fsdp2" else "1",
                    f"{result['written'] / 2**20:.0f}",
                    f"{result['written'] / ddp['written']:.3f} (goal <= {1.5 / world:.3f})" if name == "fsdp2" else "1",
                    f"{result['save']:.2f}",
                    f"{result['load']:.2f}",
                ])  # fmt: skip
    header = ["strategy x processes", "state MB/rank", "vs DDP", "checkpoint MB/rank",
              "vs full file", "save s (slowest rank)", "load s (slowest rank)"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
