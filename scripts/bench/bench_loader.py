"""Train-loader throughput over optimized shards, in both orders the template has: the
global order (the default: items read by index through a map-style loader and the
``GlobalOrderSampler``; blockwise, and as one permutation of all samples, the order before
windows) and litdata's own ``StreamingDataLoader`` (``--data.global_order
false``, chunk by chunk), and the global order without ``streaming.owned_bytes``'s
copy of each ``bytes`` field, vs the same arrays from a numpy memmap through a plain
DataLoader (num_workers 0, 1, 2; same batch size and collate work).

    .venv/bin/python scripts/bench/bench_loader.py [--samples 100000] [--repeats 5]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import bench_args, interleave, machine, synthetic_source, table

from examples.digits.data import DigitsDataModule
from examples.digits.prepare import prepare
from train_template.order import GlobalOrderSampler
from train_template.order_loader import loader_order
from train_template.seam.loop import loader_with_sampler

BATCH = 256


class MemmapImages(torch.utils.data.Dataset):
    def __init__(self, images_path: Path, labels: np.ndarray):
        self.images_path, self.labels, self.images = str(images_path), labels, None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if self.images is None:  # opened lazily, once per worker
            self.images = np.load(self.images_path, mmap_mode="r")
        return index, self.images[index], self.labels[index]


def memmap_collate(samples):
    """The template collate's output: uint8 images (floats are made on the device)."""
    images = np.stack([s[1] for s in samples]).reshape(len(samples), -1)
    return {
        "index": torch.tensor([s[0] for s in samples]),
        "image": torch.from_numpy(images),
        "label": torch.tensor([int(s[2]) for s in samples]),
    }


def as_read(item):
    """litdata's item as it reads it: ``bytes`` fields as views into the mapped chunk."""
    return item


def samples_per_second(loader) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["label"])
    return count / (time.perf_counter() - start)


def main() -> None:
    args = bench_args(__doc__, 100_000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = synthetic_source(tmp / "synthetic.npz", args.samples)
        prepare(str(source), tmp / "shards", num_workers=2, log=lambda *_: None)
        with np.load(source) as arrays:
            np.save(tmp / "images.npy", arrays["images"])
            labels = arrays["labels"]
        size_mb = (tmp / "images.npy").stat().st_size / 1e6
        print(
            f"# Loader throughput\n\n{machine()}\n\n{args.samples} samples of 3x32x32 uint8 "
            f"({size_mb:.0f} MB), batch {BATCH}, one full pass per measurement\n"
        )
        for workers in (0, 1, 2):
            data = DigitsDataModule(
                str(tmp / "shards"), batch_size=BATCH, num_workers=workers, shuffle=True,
                global_order=False,
            )  # fmt: skip
            data.setup("fit")
            in_order = DigitsDataModule(
                str(tmp / "shards"), batch_size=BATCH, num_workers=workers, shuffle=True
            )
            in_order.setup("fit")
            items = in_order.train_dataloader()  # what the trainer is handed, then given:
            order = loader_order(items).global_order(world_size=1, accumulate_grad_batches=1)
            ordered = loader_with_sampler(items, GlobalOrderSampler(order, 1, 0, BATCH))
            # The order before windows (--plan.shuffle_window null): no chunk locality.
            full = loader_order(items).global_order(1, 1, {"shuffle_window": None})
            unwindowed = loader_with_sampler(
                in_order.train_dataloader(), GlobalOrderSampler(full, 1, 0, BATCH)
            )
            # The cost of streaming.owned_bytes (bytes fields copied out of the chunk's map):
            # the same loader over a dataset that hands back the views.
            viewed = DigitsDataModule(
                str(tmp / "shards"), batch_size=BATCH, num_workers=workers, shuffle=True
            )
            viewed.setup("fit")
            viewed.datasets["train"].transform = as_read
            views = loader_with_sampler(
                viewed.train_dataloader(), GlobalOrderSampler(order, 1, 0, BATCH)
            )
            memmap = torch.utils.data.DataLoader(
                MemmapImages(tmp / "images.npy", labels),
                batch_size=BATCH,
                shuffle=True,
                num_workers=workers,
                collate_fn=memmap_collate,
                persistent_workers=workers > 0,
            )
            streaming = data.train_dataloader()  # built once: persistent workers, like memmap's
            results = interleave(
                {
                    "numpy memmap DataLoader": lambda m=memmap: samples_per_second(m),
                    "StreamingDataLoader": lambda s=streaming: samples_per_second(s),
                    "global order (default)": lambda o=ordered: samples_per_second(o),
                    "global order, one permutation": lambda u=unwindowed: samples_per_second(u),
                    "global order, bytes as views": lambda v=views: samples_per_second(v),
                },
                args.repeats,
            )
            print(
                table(
                    f"num_workers={workers}: samples/s",
                    results,
                    "samples/s",
                    "numpy memmap DataLoader",
                    lower_is_better=False,
                )
            )
            print()


if __name__ == "__main__":
    main()
