"""Writing litdata shards safely: one writer at a time, idempotent, swapped in whole.

Every data preparation script needs the same four things:

- :func:`exclusive`: several nodes or runs that start together on a shared filesystem
  wait for one preparation instead of writing over each other;
- :func:`is_up_to_date`: ``dataset.json`` records a fingerprint of the source and the
  settings; unchanged inputs skip the work (``--force`` rebuilds);
- :func:`staged_splits`: splits are written into ``.staging/`` and moved into place only
  once all of them are complete, so a killed preparation never leaves half a dataset;
- :func:`write_in_process`: litdata's own writer in this process (no worker start-up),
  for small data and test fixtures; ``litdata.optimize`` writes the same format.

``out_dir`` may be a local folder or an object-storage URL (``s3://bucket/prefix``, any
fsspec URL). For a URL the splits are written into a local staging folder, uploaded
split by split (s3fs, which honours ``AWS_ENDPOINT_URL`` and plain-http endpoints), and
``dataset.json`` is written last: it is the "complete" mark, so an upload cut short is
rebuilt by the next preparation. Object storage has no lock: prepare a bucket's shards
once (one process) before the jobs that read them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from train_template.storage import file_lock, is_url, read_text, url_fs

SPLITS = ("train", "val", "test")
METADATA_FILE = "dataset.json"


@contextmanager
def exclusive(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the preparation lock of ``out_dir`` (a file beside it; none for a URL)."""
    if is_url(out_dir):
        yield
        return
    out_dir = Path(out_dir)
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        yield


def is_up_to_date(out_dir: str | os.PathLike, fingerprint: str) -> dict | None:
    """The recorded metadata when the shards match ``fingerprint`` and every split is
    there; None when they must be (re)built."""
    root = str(out_dir).rstrip("/")
    text = read_text(f"{root}/{METADATA_FILE}")
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return None
    complete = all(read_text(f"{root}/{split}/index.json") is not None for split in SPLITS)
    return meta if complete and meta.get("fingerprint") == fingerprint else None


@contextmanager
def staged_splits(out_dir: str | os.PathLike, meta: dict) -> Iterator[Path]:
    """Yield the staging folder to write ``<split>/`` folders into; on success, swap all
    splits in and write ``meta`` (with the fingerprint) to ``dataset.json``."""
    if is_url(out_dir):
        with _staged_upload(str(out_dir).rstrip("/"), meta) as staging:
            yield staging
        return
    out_dir = Path(out_dir)
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


@contextmanager
def _staged_upload(url: str, meta: dict) -> Iterator[Path]:
    fs, root = url_fs(url)
    staging = Path(tempfile.mkdtemp(prefix="shards-staging-"))
    try:
        yield staging
        if fs.exists(f"{root}/{METADATA_FILE}"):
            fs.rm(f"{root}/{METADATA_FILE}")  # incomplete until the new one is written
        for split in SPLITS:
            if fs.exists(f"{root}/{split}"):
                fs.rm(f"{root}/{split}", recursive=True)
            files = sorted((staging / split).iterdir())
            fs.put([str(f) for f in files], [f"{root}/{split}/{f.name}" for f in files])
        fs.pipe_file(f"{root}/{METADATA_FILE}", json.dumps(meta, indent=1).encode())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_in_process(items: Iterable[Any], out_dir: Path, **writer_options: Any) -> None:
    """The same shard format as ``litdata.optimize``, written by litdata's own
    ``BinaryWriter`` here (``chunk_bytes`` or ``chunk_size``, ``item_loader``)."""
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out_dir), **writer_options)
    for position, item in enumerate(items):
        writer.add_item(position, item)
    writer.done()
    writer.merge()
