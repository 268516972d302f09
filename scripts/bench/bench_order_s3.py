"""Reads from object storage per epoch, by sample order, with a local chunk cache of a
quarter of the dataset: GET requests and bytes sent by the store over two epochs of the
train loader, in the blockwise global order (the default; windows of 4 chunks here, so
that two windows fit the cache), in one permutation of all samples (the order before
windows) and in litdata's own stream, each from a cold cache, and samples/s.

    .venv/bin/python scripts/bench/bench_order_s3.py [--samples 20000] [--workers 0]

The store is a real SeaweedFS server on loopback (the test suite's ``tests/cluster.py``),
stopped by its pid; the counts are the server's own (its Prometheus counters, one bucket
per case). Read amplification is bytes sent over the train split's bytes per epoch.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from common import bench_args, machine, synthetic_source

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from cluster import object_store  # noqa: E402
from conftest import free_port  # noqa: E402

from examples.digits.data import DigitsDataModule  # noqa: E402
from examples.digits.prepare import prepare  # noqa: E402
from train_template.errors import UserError  # noqa: E402
from train_template.order import GlobalOrderSampler  # noqa: E402
from train_template.order_loader import chunk_keeper, loader_order, reads_behind  # noqa: E402
from train_template.seam.litdata import set_loader_epoch  # noqa: E402
from train_template.seam.loop import loader_with_sampler  # noqa: E402

BATCH, WINDOW, EPOCHS = 256, 4, 2


def epochs(url: str, order: str, cache_bytes: int, workers: int) -> tuple[int, float]:
    """(samples read, seconds) over EPOCHS epochs of the train loader from a cold cache."""
    data = DigitsDataModule(
        url, batch_size=BATCH, shuffle=True, global_order=order != "stream", num_workers=workers
    )
    data.setup("fit")
    data.datasets["train"].max_cache_size = cache_bytes  # litdata's budget, read when used
    loader = data.train_dataloader()
    if order != "stream":
        settings = loader_order(loader)
        window = {"shuffle_window": WINDOW if order == "blockwise" else None}
        sampler = GlobalOrderSampler(
            settings.global_order(1, 1, window),
            1,
            0,
            BATCH,
            keep_blocks=chunk_keeper(loader, settings),
            reads_behind=reads_behind(loader, 1),
        )
        loader = loader_with_sampler(loader, sampler)
    samples, start = 0, time.perf_counter()
    for epoch in range(EPOCHS):
        if order == "stream":
            set_loader_epoch(loader, epoch)
        else:
            sampler.set_epoch(epoch)
        samples += sum(len(batch["label"]) for batch in loader)
    return samples, time.perf_counter() - start


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    parser = bench_args(__doc__, 20_000, parse=False)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "store").mkdir()
        ports = [free_port() for _ in range(10)]
        with object_store(tmp / "store", ports[:9], metrics_port=ports[9]) as store:
            os.environ.update(store.env)
            source = synthetic_source(tmp / "synthetic.npz", args.samples)
            lines = [f"# Reads per epoch from object storage ({machine()})", ""]
            rows = []
            for order in ("blockwise", "one permutation", "stream"):
                # A bucket per case: the server counts per bucket; a cold cache per URL.
                bucket = store.bucket(f"bench-{order.replace(' ', '-')}")
                url = f"s3://{bucket}/shards"
                prepare(str(source), url, num_workers=0, chunk_bytes="1MB", log=lambda *_: None)
                from litdata import StreamingDataset

                train = StreamingDataset(f"{url}/train")
                train[0]  # litdata reads the index at the first item
                chunks = train.cache._reader.config._chunks
                total = sum(chunk["chunk_bytes"] for chunk in chunks)
                gets_before, sent_before = store.reads(bucket)
                try:
                    samples, seconds = epochs(url, order, total // 4, args.workers)
                except UserError as error:  # the cache budget is refused before any read
                    cells = ["refused: " + str(error)[:60] + "...", "", "", "", ""]
                else:
                    gets, sent = store.reads(bucket)
                    gets, sent = (gets - gets_before) / EPOCHS, (sent - sent_before) / EPOCHS
                    cells = [f"{gets:.0f}", f"{sent / 1e6:.1f}", f"{sent / total:.2f}"]
                    cells += [samples // EPOCHS, f"{samples / seconds:.0f}"]
                cells = [order, len(chunks), f"{total / 1e6:.1f}", *cells]
                rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
                print(rows[-1], file=sys.stderr, flush=True)
            lines += [
                f"{args.samples} samples of 3x32x32 uint8 (train split), 1 MB chunks, cache "
                f"budget a quarter of the train split, blockwise windows of {WINDOW} chunks, "
                f"{args.workers} loader workers, per epoch over {EPOCHS} epochs",
                "",
                "| order | chunks | train MB | GETs | MB sent | read amplification | samples read | samples/s |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                *rows,
            ]
            print("\n".join(lines))


if __name__ == "__main__":
    main()
