"""The Python standard library's own source -> litdata token shards (train/val/test).

Real text that every machine has offline: every ``.py`` file under the running
interpreter's standard library, test folders excluded (about 13 MB). The split is by
whole file, decided by a hash of the file's relative path, so it is the same on
every machine and validation text is never seen in training.

Tokens are bytes (vocabulary 256): ``encode`` below is the one place to plug in a real
tokenizer (return a 1-D integer tensor; raise ``vocab_size`` in the model to match).
Each file becomes one item: its tokens followed by ``SEPARATOR`` (byte 0, which never
occurs in Python source). ``litdata.optimize`` packs items into chunks of about
``chunk_tokens`` tokens, never splitting an item; ``TokensLoader(block_size)`` then
reads each chunk as consecutive blocks and drops the chunk's last
``chunk_tokens % block_size`` tokens or fewer (the documented tail: under one block
per chunk). Idempotent: ``dataset.json`` records a fingerprint of the file list and
settings; unchanged inputs skip the work, ``force`` rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from examples.digits.prepare import exclusive
from train_template.quiet import without_banners

SPLITS = ("train", "val", "test")
METADATA_FILE = "dataset.json"
FORMAT_VERSION = 1
SEPARATOR = 0
TEST_DIRS = {"test", "tests", "idle_test"}


def encode(text: bytes) -> torch.Tensor:
    """Bytes -> token ids: the tokenizer. Byte-level here (ids 0..255)."""
    return torch.from_numpy(np.frombuffer(text, dtype=np.uint8).copy())


def decode(tokens: list[int]) -> str:
    """Token ids -> text (the inverse of ``encode``)."""
    return bytes(t for t in tokens if t != SEPARATOR).decode("utf-8", errors="replace")


def source_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Every .py file of the standard library outside test folders and site-packages,
    sorted by relative path (the same order on every machine)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & TEST_DIRS or "site-packages" in parts or "dist-packages" in parts:
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(relative_path: str, val_percent: float, test_percent: float) -> str:
    """train/val/test for one file, from a hash of its path (stable across machines)."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 10_000 / 100
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + val_percent:
        return "val"
    return "train"


def item_tokens(path: str) -> torch.Tensor:
    """One item: a file's tokens and the separator (litdata's worker function yields it)."""
    return torch.cat(
        [encode(Path(path).read_bytes()), torch.tensor([SEPARATOR], dtype=torch.uint8)]
    )


def _items(path: str):
    yield item_tokens(path)


def prepare(
    out_dir: str | os.PathLike,
    root: str | os.PathLike | None = None,
    val_percent: float = 2.0,
    test_percent: float = 1.0,
    chunk_tokens: int = 1 << 20,
    num_workers: int = 1,
    force: bool = False,
    log=print,
) -> dict:
    """Build (or confirm) the token shards; returns the metadata in ``dataset.json``."""
    out_dir = Path(out_dir)
    with exclusive(out_dir):
        return _prepare(
            out_dir, root, val_percent, test_percent, chunk_tokens, num_workers, force, log
        )


def _prepare(out_dir, root, val_percent, test_percent, chunk_tokens, num_workers, force, log):
    import litdata
    from litdata.streaming.item_loader import TokensLoader

    start = time.perf_counter()
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = source_files(root)
    relative = [f.relative_to(root).as_posix() for f in files]
    settings = [FORMAT_VERSION, val_percent, test_percent, chunk_tokens]
    digest = hashlib.sha256(json.dumps(settings).encode())
    for name, path in zip(relative, files, strict=True):
        digest.update(f"{name}:{path.stat().st_size}\n".encode())
    fingerprint = digest.hexdigest()
    meta_path = out_dir / METADATA_FILE
    if not force and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint and all(
            (out_dir / split / "index.json").is_file() for split in SPLITS
        ):
            log(
                f"{out_dir}: token shards are up to date ({meta['tokens']} tokens); --force rebuilds"
            )
            return meta

    by_split = {split: [] for split in SPLITS}
    for name, path in zip(relative, files, strict=True):
        by_split[split_of(name, val_percent, test_percent)].append(str(path))
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    tokens = {}
    for split, paths in by_split.items():
        tokens[split] = sum(Path(p).stat().st_size + 1 for p in paths)
        log(f"[{split}] {len(paths)} files, {tokens[split]:,} tokens -> {out_dir / split}")
        if num_workers == 0:  # in this process: small data and test fixtures
            from litdata.streaming.writer import BinaryWriter

            writer = BinaryWriter(
                str(staging / split), chunk_size=chunk_tokens, item_loader=TokensLoader()
            )
            for position, path in enumerate(paths):
                writer.add_item(position, item_tokens(path))
            writer.done()
            writer.merge()
            continue
        with without_banners():
            litdata.optimize(
                fn=_items,
                inputs=paths,
                output_dir=str(staging / split),
                chunk_size=chunk_tokens,
                item_loader=TokensLoader(),
                num_workers=num_workers,
                keep_data_ordered=True,
            )
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)
        os.replace(staging / split, out_dir / split)
    shutil.rmtree(staging, ignore_errors=True)
    meta = {
        "source": str(root),
        "fingerprint": fingerprint,
        "files": {
            split: [Path(p).relative_to(root).as_posix() for p in paths]
            for split, paths in by_split.items()
        },
        "tokens": tokens,
        "vocab_size": 256,
        "separator": SEPARATOR,
        "chunk_tokens": chunk_tokens,
        "format_version": FORMAT_VERSION,
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"{out_dir}: wrote {tokens} tokens in {time.perf_counter() - start:.1f}s")
    return meta
