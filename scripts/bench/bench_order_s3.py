"""Reads from object storage per epoch, by sample order, with a local chunk cache of a
quarter of the dataset: chunk downloads (GETs of whole chunks) and bytes downloaded over
one epoch of the train loader, in the blockwise global order (the default; windows of 4
chunks here, so that two windows fit the cache), in one permutation of all samples (the
order before windows) and in litdata's own stream, each from a cold cache.

    .venv/bin/python scripts/bench/bench_order_s3.py [--samples 20000]

The store is a real SeaweedFS server on loopback (the test suite's ``tests/cluster.py``),
stopped by its pid. The count wraps litdata's ``S3Downloader.download_file`` (every
chunk download goes through it; main process, no loader workers). Read amplification is
bytes downloaded over the dataset's bytes.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

from common import bench_args, machine, synthetic_source

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from cluster import object_store  # noqa: E402
from conftest import free_port  # noqa: E402

from examples.digits.data import DigitsDataModule  # noqa: E402
from examples.digits.prepare import prepare  # noqa: E402
from train_template.order import GlobalOrderSampler  # noqa: E402
from train_template.order_loader import loader_order  # noqa: E402
from train_template.seam.loop import loader_with_sampler  # noqa: E402

BATCH, WINDOW = 256, 4
DOWNLOADS = {"count": 0, "bytes": 0}


def count_downloads() -> None:
    from litdata.streaming.downloader import S3Downloader

    original = S3Downloader.download_file

    def counted(self, remote_filepath: str, local_filepath: str) -> None:
        original(self, remote_filepath, local_filepath)
        if os.path.exists(local_filepath):
            DOWNLOADS["count"] += 1
            DOWNLOADS["bytes"] += os.path.getsize(local_filepath)

    S3Downloader.download_file = counted


def one_epoch(url: str, order: str, cache_bytes: int) -> tuple[int, int, int]:
    """(chunk downloads, bytes downloaded, samples) of one epoch from a cold cache."""
    data = DigitsDataModule(url, batch_size=BATCH, shuffle=True, global_order=order != "stream")
    data.setup("fit")
    dataset = data.datasets["train"]
    dataset.max_cache_size = cache_bytes  # litdata's cache budget, read when its cache is made
    loader = data.train_dataloader()
    if order != "stream":
        settings = loader_order(loader)
        window = {"shuffle_window": WINDOW if order == "blockwise" else None}
        loader = loader_with_sampler(
            loader, GlobalOrderSampler(settings.global_order(1, 1, window), 1, 0, BATCH)
        )
    DOWNLOADS.update(count=0, bytes=0)
    samples = sum(len(batch["label"]) for batch in loader)
    return DOWNLOADS["count"], DOWNLOADS["bytes"], samples


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    args = bench_args(__doc__, 20_000)
    count_downloads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "store").mkdir()
        with object_store(tmp / "store", [free_port() for _ in range(9)]) as store:
            os.environ.update(store.env)
            source = synthetic_source(tmp / "synthetic.npz", args.samples)
            lines = [f"# Reads per epoch from object storage ({machine()})", ""]
            rows = []
            for order in ("blockwise", "one permutation", "stream"):
                # A fresh prefix per case: litdata caches chunks per URL (a cold cache).
                url = f"s3://{store.bucket('bench')}/shards-{order.replace(' ', '-')}"
                prepare(str(source), url, num_workers=0, chunk_bytes="1MB", log=lambda *_: None)
                from litdata import StreamingDataset

                train = StreamingDataset(f"{url}/train")
                train[0]  # litdata reads the index at the first item
                chunks = train.cache._reader.config._chunks
                total = sum(chunk["chunk_bytes"] for chunk in chunks)
                try:
                    count, downloaded, samples = one_epoch(url, order, total // 4)
                except Exception as error:  # litdata's reader gave up: the row says how
                    cells = [f"{type(error).__name__} after {DOWNLOADS['count']} downloads"]
                    cells += [f"{DOWNLOADS['bytes'] / 1e6:.1f}", "", ""]
                else:
                    cells = [count, f"{downloaded / 1e6:.1f}", f"{downloaded / total:.2f}", samples]
                cells = [order, len(chunks), f"{total / 1e6:.1f}", *cells]
                rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
                print(rows[-1], file=sys.stderr, flush=True)
            lines += [
                f"{args.samples} samples of 3x32x32 uint8 (train split), 1 MB chunks, cache "
                f"budget a quarter of the train split, blockwise windows of {WINDOW} chunks",
                "",
                "| order | chunks | train MB | chunk downloads | MB downloaded | read amplification | samples read |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                *rows,
            ]
            print("\n".join(lines))


if __name__ == "__main__":
    main()
