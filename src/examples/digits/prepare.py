"""Turn an image-classification source into litdata train/val/test shards.

The embedded default is scikit-learn's handwritten digits (1,797 8x8 images, 10
classes), which ship inside the scikit-learn wheel: no download. Your own data
comes in as one ``.npz`` file with ``images`` (N x H x W or N x C x H x W, uint8) and
``labels`` (N integers); see the README.

Each sample is ``{"index": int, "image": bytes, "label": int}``. The ``index`` is the
sample's position in the source, so every run can say exactly which samples it saw.
The split is a seeded permutation, so the same source and seed give the same
split on every machine. A fingerprint of source and settings in ``dataset.json``
makes the preparation idempotent: unchanged inputs skip the work, ``force`` rebuilds.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from train_template.quiet import without_banners
from train_template.shards import exclusive, is_up_to_date, staged_splits, write_in_process

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SplitSettings:
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1


def load_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; stretch them to the full uint8 range.
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        return images, digits.target.astype(np.int64)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"--source {source!r} is neither 'digits' nor an existing .npz file: "
            "pass 'digits' or the path of an .npz with 'images' and 'labels'"
        )
    with np.load(path) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(
                f"{source} lacks the array(s) {sorted(missing)}: save images and labels"
            )
        images, labels = archive["images"], archive["labels"]
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"{source}: images must be uint8 of shape (N, H, W) or (N, C, H, W), "
            f"got {images.dtype} {images.shape}"
        )
    if len(labels) != len(images):
        raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def split_indices(num_samples: int, settings: SplitSettings) -> dict[str, np.ndarray]:
    """Disjoint, seeded split of ``range(num_samples)``; each split sorted by index."""
    order = np.random.default_rng(settings.seed).permutation(num_samples)
    num_test = int(round(settings.test_fraction * num_samples))
    num_val = int(round(settings.val_fraction * num_samples))
    parts = {
        "test": order[:num_test],
        "val": order[num_test : num_test + num_val],
        "train": order[num_test + num_val :],
    }
    return {name: np.sort(part) for name, part in parts.items()}


def fingerprint(images: np.ndarray, labels: np.ndarray, settings: SplitSettings) -> str:
    digest = hashlib.sha256()
    digest.update(str((FORMAT_VERSION, images.shape, asdict(settings))).encode())
    digest.update(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels).data)
    return digest.hexdigest()


def _write_samples(index_range: tuple[int, int], images_path: str, labels: np.ndarray):
    """litdata worker function: yields the samples of one contiguous index range."""
    images = np.load(images_path, mmap_mode="r")
    for position in range(*index_range):
        yield {
            "index": int(labels[position, 0]),
            "image": images[position].tobytes(),
            "label": int(labels[position, 1]),
        }


def prepare(
    source: str,
    out_dir: str | os.PathLike,
    settings: SplitSettings = SplitSettings(),
    force: bool = False,
    num_workers: int = 1,
    chunk_bytes: str = "16MB",
    log=print,
) -> dict:
    """Build (or confirm) the shards; returns the metadata written to ``dataset.json``."""
    out_dir = str(out_dir).rstrip("/")  # a folder or an object-storage URL (train_template.shards)
    with exclusive(out_dir):
        return _prepare(source, out_dir, settings, force, num_workers, chunk_bytes, log)


def _prepare(source, out_dir: str, settings, force, num_workers, chunk_bytes, log) -> dict:
    import litdata

    start = time.perf_counter()
    images, labels = load_source(source)
    expected = fingerprint(images, labels, settings)
    if not force and (meta := is_up_to_date(out_dir, expected)):
        log(f"{out_dir}: shards are up to date ({meta['counts']}); use --force to rebuild")
        return meta
    parts = split_indices(len(images), settings)
    counts = {split: int(len(indices)) for split, indices in parts.items()}
    meta = {
        "source": source,
        "fingerprint": expected,
        "image_shape": list(images.shape[1:]),
        "num_classes": int(labels.max()) + 1,
        "counts": counts,
        "split": asdict(settings),
        "format_version": FORMAT_VERSION,
    }
    with staged_splits(out_dir, meta) as staging:
        for split, indices in parts.items():
            # A contiguous copy on disk lets every worker memory-map its ranges cheaply.
            images_path = staging / f"{split}-images.npy"
            np.save(images_path, images[indices])
            index_and_label = np.stack([indices, labels[indices]], axis=1)
            log(f"[{split}] writing {len(indices)} samples to {out_dir}/{split}")
            if num_workers == 0:
                samples = _write_samples((0, len(indices)), str(images_path), index_and_label)
                write_in_process(samples, staging / split, chunk_bytes=chunk_bytes)
            else:
                step = max(1, len(indices) // max(1, 4 * num_workers))
                ranges = [(lo, min(lo + step, len(indices))) for lo in range(0, len(indices), step)]
                with without_banners():
                    litdata.optimize(
                        fn=partial(
                            _write_samples, images_path=str(images_path), labels=index_and_label
                        ),
                        inputs=ranges,
                        output_dir=str(staging / split),
                        chunk_bytes=chunk_bytes,
                        num_workers=num_workers,
                        keep_data_ordered=True,
                        verbose=True,
                    )
            images_path.unlink()
    log(f"{out_dir}: wrote {counts} in {time.perf_counter() - start:.1f}s")
    return meta
