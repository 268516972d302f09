"""The Python standard library's own source -> litdata token shards (train/val/test).

Real text that every machine has offline: every ``.py`` file under the running
interpreter's standard library, test folders excluded (about 13 MB). The split is by
whole file, decided by a hash of the file's relative path, so it is the same on
every machine and validation text is never seen in training.

Tokens are bytes (vocabulary 256): ``encode`` below is the one place to plug in a real
tokenizer (return a 1-D integer tensor; raise ``vocab_size`` in the model to match).

Why pieces, shuffled: litdata's shuffle permutes chunks, then samples inside a chunk,
so a loader draws every sample of one chunk before it moves on. Files packed whole and
in path order made a chunk one package (all of ``encodings/``, say) for hundreds of
steps, and the model chased it (train loss 0.8, held-out 2.4). So every file is cut
into pieces of at most ``piece_tokens`` tokens, each piece is one item (its tokens then
``SEPARATOR``, byte 0, which never occurs in Python source, marking the jump), the
pieces of a split are packed in a fixed shuffled order (``packing_order``), and chunks
are small (``chunk_tokens``): a chunk mixes several files from across the library.
``litdata.optimize`` never splits an item; ``TokensLoader(block_size)`` reads each chunk
as consecutive blocks and drops the chunk's last ``chunk_tokens % block_size`` tokens
or fewer (the documented tail: under one block per chunk). Idempotent:
``dataset.json`` records a fingerprint of the file list and settings; unchanged inputs
skip the work, ``force`` rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from train_template.quiet import without_banners
from train_template.shards import (
    SPLITS,
    exclusive,
    is_up_to_date,
    staged_splits,
    write_in_process,
)

FORMAT_VERSION = 2  # 2: pieces in shuffled order (1: whole files in path order)
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


Piece = tuple[str, int, int]  # (path, first byte, end byte)


def packing_order(paths: list[str], piece_tokens: int, seed: int = 0) -> list[Piece]:
    """Every file cut into consecutive pieces of at most ``piece_tokens`` bytes, all
    pieces of the split in one shuffled order (fixed by ``seed``): the items, in the
    order they are packed. An empty file is one empty piece (its item is the separator)."""
    pieces = []
    for path in paths:
        size = Path(path).stat().st_size
        pieces += [
            (path, start, min(start + piece_tokens, size)) for start in range(0, size, piece_tokens)
        ]
        if size == 0:
            pieces.append((path, 0, 0))
    random.Random(seed).shuffle(pieces)
    return pieces


def item_tokens(piece: Piece) -> torch.Tensor:
    """One item: a piece's tokens and the separator."""
    path, start, end = piece
    with open(path, "rb") as file:
        file.seek(start)
        text = file.read(end - start)
    return torch.cat([encode(text), torch.tensor([SEPARATOR], dtype=torch.uint8)])


def _items(piece: Piece):
    yield item_tokens(piece)


def prepare(
    out_dir: str | os.PathLike,
    root: str | os.PathLike | None = None,
    val_percent: float = 2.0,
    test_percent: float = 1.0,
    chunk_tokens: int = 1 << 15,
    piece_tokens: int = 1 << 12,
    num_workers: int = 1,
    force: bool = False,
    log=print,
) -> dict:
    """Build (or confirm) the token shards; returns the metadata in ``dataset.json``."""
    out_dir = str(out_dir).rstrip("/")  # a folder or an object-storage URL (train_template.shards)
    with exclusive(out_dir):
        return _prepare(
            out_dir,
            root,
            val_percent,
            test_percent,
            chunk_tokens,
            piece_tokens,
            num_workers,
            force,
            log,
        )


def _prepare(
    out_dir, root, val_percent, test_percent, chunk_tokens, piece_tokens, num_workers, force, log
):
    import litdata
    from litdata.streaming.item_loader import TokensLoader

    start = time.perf_counter()
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = source_files(root)
    relative = [f.relative_to(root).as_posix() for f in files]
    settings = [FORMAT_VERSION, val_percent, test_percent, chunk_tokens, piece_tokens]
    digest = hashlib.sha256(json.dumps(settings).encode())
    for name, path in zip(relative, files, strict=True):
        digest.update(f"{name}:{path.stat().st_size}\n".encode())
    fingerprint = digest.hexdigest()
    if not force and (meta := is_up_to_date(out_dir, fingerprint)):
        log(f"{out_dir}: token shards are up to date ({meta['tokens']} tokens); --force rebuilds")
        return meta

    by_split = {split: [] for split in SPLITS}
    for name, path in zip(relative, files, strict=True):
        by_split[split_of(name, val_percent, test_percent)].append(str(path))
    pieces = {split: packing_order(paths, piece_tokens) for split, paths in by_split.items()}
    tokens = {
        split: sum(end - begin + 1 for _, begin, end in split_pieces)
        for split, split_pieces in pieces.items()
    }
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
        "piece_tokens": piece_tokens,
        "format_version": FORMAT_VERSION,
    }
    with staged_splits(out_dir, meta) as staging:
        for split, split_pieces in pieces.items():
            log(
                f"[{split}] {len(by_split[split])} files, {len(split_pieces)} pieces, "
                f"{tokens[split]:,} tokens -> {out_dir}/{split}"
            )
            if num_workers == 0:  # in this process: small data and test fixtures
                items = (item_tokens(piece) for piece in split_pieces)
                write_in_process(
                    items, staging / split, chunk_size=chunk_tokens, item_loader=TokensLoader()
                )
                continue
            with without_banners():
                litdata.optimize(
                    fn=_items,
                    inputs=split_pieces,
                    output_dir=str(staging / split),
                    chunk_size=chunk_tokens,
                    item_loader=TokensLoader(),
                    num_workers=num_workers,
                    keep_data_ordered=True,
                )
    log(f"{out_dir}: wrote {tokens} tokens in {time.perf_counter() - start:.1f}s")
    return meta
