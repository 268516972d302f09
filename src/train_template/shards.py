"""Writing litdata shards safely: one writer at a time, idempotent, swapped in whole.

Every data preparation (the examples' ``prepare.py``, yours) needs the same four things:

- :func:`exclusive`: several nodes or runs that start together on a shared filesystem
  wait for one preparation instead of writing over each other;
- :func:`is_up_to_date`: ``dataset.json`` records a fingerprint of the source and the
  settings; unchanged inputs skip the work (``--force`` rebuilds);
- :func:`staged_splits`: splits are written into ``.staging/`` and moved into place only
  once all of them are complete, so a killed preparation never leaves half a dataset;
- :func:`write_in_process`: litdata's own writer in this process (no worker start-up),
  for small data and test fixtures; ``litdata.optimize`` writes the same format.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
METADATA_FILE = "dataset.json"


@contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold the preparation lock of ``out_dir`` (a file beside it)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_up_to_date(out_dir: Path, fingerprint: str) -> dict | None:
    """The recorded metadata when the shards match ``fingerprint`` and every split is
    there; None when they must be (re)built."""
    meta_path = out_dir / METADATA_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    complete = all((out_dir / split / "index.json").is_file() for split in SPLITS)
    return meta if complete and meta.get("fingerprint") == fingerprint else None


@contextmanager
def staged_splits(out_dir: Path, meta: dict) -> Iterator[Path]:
    """Yield the staging folder to write ``<split>/`` folders into; on success, swap all
    splits in and write ``meta`` (with the fingerprint) to ``dataset.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    yield staging
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)
        os.replace(staging / split, out_dir / split)
    shutil.rmtree(staging, ignore_errors=True)
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=1))


def write_in_process(items: Iterable[Any], out_dir: Path, **writer_options: Any) -> None:
    """The same shard format as ``litdata.optimize``, written by litdata's own
    ``BinaryWriter`` here (``chunk_bytes`` or ``chunk_size``, ``item_loader``)."""
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out_dir), **writer_options)
    for position, item in enumerate(items):
        writer.add_item(position, item)
    writer.done()
    writer.merge()
