"""Run files on a local disk or in object storage, through one fsspec interface.

Checkpoints, ``plan.json`` and the logs of a run live under ``--trainer.default_root_dir``,
which may be a local path or an object-storage URL (``s3://bucket/prefix``; s3fs, the
fsspec backend Lightning itself writes checkpoints through, reads ``AWS_ENDPOINT_URL``
and the other ``AWS_*`` variables). The resume machinery (which checkpoint is the newest
complete one, damaged files set aside, no overwrite of an earlier run) calls these
functions and works the same on both. Paths are strings: a URL keeps its scheme.

Object storage has no rename: :func:`move` is a copy and a delete. A checkpoint is still
never half-written under its name: Lightning writes it with one upload that becomes
visible only when complete (an S3 PUT or a completed multipart upload).
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def is_url(path: str | os.PathLike) -> bool:
    """An object-storage (fsspec) URL rather than a local path."""
    return "://" in str(path)


def url_fs(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it; ``storage_options`` are
    litdata's (boto3 client arguments, ``--data.storage_options``), turned into s3fs's."""
    import fsspec

    return fsspec.core.url_to_fs(url, **s3fs_options(storage_options or {}))


def s3fs_options(boto3_options: dict) -> dict:
    """litdata's ``storage_options`` (boto3 ``client()`` arguments: ``endpoint_url``,
    ``aws_access_key_id``, ...) as s3fs arguments, so one setting serves both readers."""
    options = dict(boto3_options)
    renamed = {
        "aws_access_key_id": "key",
        "aws_secret_access_key": "secret",
        "aws_session_token": "token",
    }
    result = {renamed[k]: options.pop(k) for k in list(options) if k in renamed}
    if options:
        result["client_kwargs"] = options  # endpoint_url, region_name, verify, ...
    return result


def join(directory: str, *names: str) -> str:
    """``directory/name``, keeping a URL's ``scheme://`` (``Path`` would fold it)."""
    if is_url(directory):
        return posixpath.join(str(directory).rstrip("/"), *names)
    return str(Path(directory, *names))


def name_of(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def _with_scheme(url: str, inner: str) -> str:
    return f"{str(url).split('://', 1)[0]}://{inner}"


def exists(path: str) -> bool:
    if not is_url(path):
        return Path(path).exists()
    fs, inner = url_fs(path)
    return fs.exists(inner)


def files_in(directory: str, pattern: str) -> list[str]:
    """The files of ``directory`` matching ``pattern`` (``*.ckpt``), sorted."""
    if not is_url(directory):
        folder = Path(directory)
        return sorted(str(p) for p in folder.glob(pattern)) if folder.is_dir() else []
    fs, inner = url_fs(directory)
    fs.invalidate_cache()  # another process (a killed run, rank 0) may have written since
    return sorted(_with_scheme(directory, p) for p in fs.glob(f"{inner.rstrip('/')}/{pattern}"))


def names_in(directory: str) -> list[str]:
    """Names of the entries of ``directory`` (none when it does not exist)."""
    if not is_url(directory):
        folder = Path(directory)
        return [p.name for p in folder.iterdir()] if folder.is_dir() else []
    fs, inner = url_fs(directory)
    fs.invalidate_cache()
    try:
        return [name_of(p) for p in fs.ls(inner, detail=False)]
    except FileNotFoundError:
        return []


def size_text(count: float) -> str:
    """A byte count as a person reads it (``1008.0 KB``), in the template's error lines."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    fs, inner = url_fs(path)
    return fs.cat_file(inner)


def read_text(path: str | os.PathLike, storage_options: dict | None = None) -> str | None:
    """A small file's text, local or in object storage; None when it does not exist."""
    if not is_url(path):
        return Path(path).read_text() if Path(path).is_file() else None
    fs, inner = url_fs(str(path), storage_options)
    try:  # one request (an exists() first would be two)
        return fs.cat_file(inner).decode()
    except FileNotFoundError:
        return None


def write_bytes(path: str, data: bytes) -> None:
    if not is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return
    fs, inner = url_fs(path)
    fs.pipe_file(inner, data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


@contextmanager
def local_file(target: str) -> Iterator[Path]:
    """A local path that ``target`` is written through: ``target`` itself when local;
    else a temporary file, uploaded to ``target`` when the block ends with it written."""
    if not is_url(target):
        yield Path(target)
        return
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch, name_of(target))
        yield local
        if local.is_file():
            write_bytes(target, local.read_bytes())


@contextmanager
def local_copy(directory: str, pattern: str) -> Iterator[str]:
    """``directory`` itself when local; else a temporary local folder holding its files
    that match ``pattern`` (``*/metrics.csv``) at the same relative paths."""
    if not is_url(directory):
        yield str(directory)
        return
    fs, inner = url_fs(directory)
    fs.invalidate_cache()
    inner = inner.rstrip("/")
    with tempfile.TemporaryDirectory() as local:
        for path in fs.glob(f"{inner}/{pattern}"):
            target = Path(local, path[len(inner) + 1 :])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fs.cat_file(path))
        yield local


def move(source: str, target: str) -> None:
    if not is_url(source):
        Path(source).rename(target)
        return
    fs, inner = url_fs(source)
    fs.mv(inner, url_fs(target)[1])


def remove(path: str) -> None:
    """Delete an object (a URL) if it exists; local paths are ``atomic_save.remove``'s."""
    fs, inner = url_fs(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the local file ``path`` (created if missing): one
    process of this machine at a time, released also when the holder dies."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_writable(root: str) -> None:
    """Write and delete a probe file under ``root``; raises OSError (or the store's
    error: no bucket, bad credentials, no endpoint) when that fails."""
    probe = join(root, f".write-test-{os.getpid()}")
    if not is_url(root):
        Path(root).mkdir(parents=True, exist_ok=True)
        Path(probe).write_text("")
        Path(probe).unlink()
        return
    fs, inner = url_fs(probe)
    _check_bucket(fs, inner.split("/", 1)[0])
    fs.pipe_file(inner, b"")
    fs.rm_file(inner)


def _check_bucket(fs: Any, bucket: str) -> None:
    """Some S3-compatible stores (SeaweedFS) create a missing bucket at the first write, so
    a mistyped bucket would silently become a new one: ask for it first (S3 only). Any
    other refusal (bad keys) is left to the probe write, whose error says why."""
    head = getattr(fs, "call_s3", None)
    if head is None:
        return
    try:
        head("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise FileNotFoundError(f"there is no bucket {bucket!r} at this endpoint") from None
    except Exception as error:  # noqa: BLE001 - the store's own errors, by library
        if outage_line(error) is not None:
            raise  # no store answers: asking again for the write would only wait longer


# What an object store that stopped answering raises, by the libraries between it and the
# run: botocore under s3fs (checkpoints, logs, plan.json), aiohttp under aiobotocore,
# obstore under litdata (chunk reads). Matched by name: none of them is imported here.
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
)
_UNREACHABLE_TEXT = (
    "Could not connect to the endpoint URL",
    "error sending request",
    "Connection refused",
)


def outage_line(error: BaseException) -> str | None:
    """One line for an object store that stopped answering mid-run (None: another error).

    The run cannot go on, and nothing is lost: a checkpoint upload appears only when
    complete, so the newest complete checkpoint is the one ``--ckpt_path auto`` finds."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        what = _unreachable_line(str(current))
        if what or type(current).__name__ in _UNREACHABLE:
            what = what or str(current).strip().split("\n")[0]
            return (
                f"the object store stopped answering ({type(current).__name__}: {what[:200]}): "
                "every checkpoint written is complete (an upload cut short leaves none); "
                "once it answers again, relaunch with --ckpt_path auto"
            )
        current = current.__cause__ or current.__context__
    return None


def _unreachable_line(text: str) -> str:
    """The line of an error's text that says which request found the store gone ("" if
    none): a loader worker's error arrives as a whole traceback in one message, litdata's
    chunk reads wrap obstore's error ("... Original error: GenericError: ... GET <url>")."""
    for line in text.splitlines():
        if any(marker in line for marker in _UNREACHABLE_TEXT):
            return line.strip().rpartition("Original error: ")[2]
    return ""
