"""litdata's datasets, loaders and object-store client. Pinned: litdata 0.2.76."""

from __future__ import annotations

import collections
import copy
import os
from typing import Any

import numpy as np


def allow_plain_http_object_store(endpoint: str | None = None, environ: Any = None) -> bool:
    """Let litdata's obstore client reach a plain-``http://`` S3 endpoint.

    litdata 0.2.76 builds every obstore ``S3Store`` with its own ``client_options``
    (``litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS``: timeouts and pool size),
    which replace the ones obstore would read from ``AWS_ALLOW_HTTP``; without
    ``allow_http`` every chunk read and upload fails ("builder error", ``BadScheme``)
    while ``index.json`` (read through boto3) works. Adding the one option to that dict
    when the endpoint is ``http://`` is the narrowest fix; forked loader workers inherit
    it. HTTPS endpoints are left alone. Reported upstream with the pinned version.
    """
    environ = os.environ if environ is None else environ
    endpoint = (
        endpoint or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or ""
    )
    if not endpoint.startswith("http://"):
        return False
    from litdata.streaming import downloader

    downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
    return True


def one_cache_writer(url: str) -> Any:
    """A lock that lets one process of this machine at a time build a ``StreamingDataset``
    of the remote ``url``.

    litdata 0.2.76 caches a remote dataset's files in ``<cache>/<md5(url)>/<updated_at>/``
    (``updated_at`` from its ``index.json``) and, building a dataset whose ``updated_at``
    is not the only one there, deletes ``<md5(url)>`` whole
    (``_clear_cache_dir_if_updated``), also while another rank of this machine is
    downloading into it: measured on the first 2-rank fit after the shards were prepared
    again, rank 1 stopped with "No such file or directory: 'chunk-0-0.bin'". After the
    first build the folder holds only the current version and nothing more is deleted,
    so loader workers, which build their caches later, need no lock. The lock file lies
    beside litdata's cache folders (per user, on this machine's disk).
    """
    import hashlib

    from litdata.utilities.dataset_utilities import get_default_cache_dir

    from train_template.storage import file_lock

    name = hashlib.md5(url.encode()).hexdigest()
    return file_lock(os.path.join(get_default_cache_dir(), f".{name}.lock"))


def read_whole_chunks(dataset: Any) -> None:
    """Reads by index (``dataset[i]``, the global order) download each remote chunk whole
    into litdata's cache and keep it there. litdata 0.2.76's default for index reads
    fetches every item's bytes with a ranged request of its own (measured: 70 items/s
    from a store on loopback, 14 ms a request). The public ``on_demand_bytes`` setter
    needs the dataset's cache, which each loader worker creates lazily from the private
    ``_on_demand_bytes``; setting that one reaches every worker."""
    dataset._on_demand_bytes = False


def keep_downloaded_chunks(dataset: Any) -> bool:
    """After a read by index in this process: litdata's reader keeps every chunk it
    downloads (the template's ``chunk_cache.WindowCache`` removes them) and memory-maps
    every chunk; False (nothing changed) before this process's reader exists.

    litdata 0.2.76 maps only the chunks it assigned to a worker's own stream
    (``Reader.enable_mmap_for_chunks``, called from ``StreamingDataset.__iter__``); a read by
    index (``dataset[i]``) of any other chunk opens the chunk file and, with per-item
    decoding, reads it whole for each item: about 1 ms an item from a remote dataset's
    local cache (840 against 41,000 items/s mapped, 3 KB items). Its download thread
    (remote shards) deletes a chunk when a read leaves it once the split exceeds its budget
    (``_delete_chunks_when_processed``, else when its byte count passes ``_max_cache_size``);
    with neither, it still counts a delete request per chunk switch (its prefetch slots are
    freed by them) in a queue it never empties, kept here to its last entry. Mapping is
    safe with the template's removals: a removed file stays mapped until unmapped, and
    litdata publishes a new download under a new inode (temp file and rename).
    """
    reader = dataset.cache._reader if dataset.cache is not None else None
    if reader is None or reader._config is None:
        return False
    thread = reader._prepare_thread
    if thread is not None:
        reader._max_cache_size = thread._max_cache_size = _NO_BUDGET
        thread._delete_chunks_when_processed = False
        thread._chunks_index_to_be_deleted = collections.deque(maxlen=1)
    reader.enable_mmap_for_chunks(set(range(len(reader._config._chunks))))
    return True


_NO_BUDGET = 1 << 62  # bytes: never "over budget" (None would stop its prefetch slots)


def chunk_downloader(dataset: Any, folder: str, chunks: list[dict]) -> Any:
    """litdata's downloader of a remote ``StreamingDataset``'s chunks into ``folder``
    (``chunks``: its index entries in chunk order); ``download_chunk_from_index(i)``
    publishes chunk ``i`` by rename and skips a chunk another process is downloading
    (0.2.76: ``get_downloader``; the same client options as the dataset's reader)."""
    from litdata.streaming.downloader import get_downloader

    return get_downloader(
        dataset.input_dir.url, folder, chunks, dataset.storage_options, dataset.session_options
    )


def item_decoder(dataset: Any) -> Any:
    """A function from one item's bytes to the item as ``dataset[i]`` returns it, where the
    chunks hold plain items (litdata's ``PyTreeLoader`` format, no compression, encryption
    or MDS); None otherwise, or before this process's reader exists (after a read).

    With it a micro-batch is read straight from each chunk's memory map
    (:func:`map_chunk`): ``dataset[i]`` costs 15 us an item in litdata 0.2.76's reader
    (index lookups, per-read chunk checks, and its one-chunk map cache, which re-maps a
    chunk and re-reads its offsets whenever reads alternate between chunks, as a
    window's do). Decoding stays litdata's (``PyTreeLoader.deserialize``), and so do
    the dataset's transforms, applied as ``StreamingDataset.__getitem__`` applies them."""
    from litdata.streaming.item_loader import PyTreeLoader

    reader = dataset.cache._reader if dataset.cache is not None else None
    if reader is None or reader._config is None:
        return None
    loader, config = reader._item_loader, reader._config._config or {}
    plain = type(loader) is PyTreeLoader and not getattr(loader, "_sample_compression", True)
    if not plain or any(config.get(key) for key in ("compression", "encryption")):
        return None
    if config.get("format") == "mds":
        return None
    transforms = getattr(dataset, "transform", None)
    transforms = transforms if isinstance(transforms, list) else [transforms] if transforms else []

    def decode(raw: Any) -> Any:
        item = loader.deserialize(raw)
        for transform in transforms:
            item = transform(item)
        return item

    return decode


def map_chunk(path: str) -> tuple[memoryview, np.ndarray]:
    """A chunk file memory-mapped, and its items' byte offsets from the file's start
    (``offsets[row]`` to ``offsets[row + 1]``): litdata's chunk format, a uint32 item
    count, then ``count + 1`` uint32 offsets, then the items (``PyTreeLoader``)."""
    import mmap

    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    count = int(np.frombuffer(mapped, dtype="<u4", count=1)[0])
    return memoryview(mapped), np.frombuffer(mapped, dtype="<u4", count=count + 1, offset=4)


def chunk_files(dataset: Any) -> tuple[str, list[str]]:
    """(the local folder litdata caches a remote ``StreamingDataset``'s chunks in, each
    chunk's file name in chunk order): ``input_dir.path`` and ``subsampled_files`` (0.2.76)."""
    return dataset.input_dir.path, list(dataset.subsampled_files)


def chunk_regions(dataset: Any) -> list[tuple[int, int]]:
    """The rows of each chunk a ``StreamingDataset`` reads, (first, end), in the order its
    indices run: litdata (0.2.76) maps index ``i`` to a chunk through
    ``region_of_interest``, one range per chunk in ``subsampled_files`` order
    (``ChunksConfig._get_chunk_index_from_index``)."""
    return [(start, end) for start, end in dataset.region_of_interest]


def chunk_sizes(dataset: Any) -> list[int]:
    """Items per chunk of a ``StreamingDataset``, in the order its indices run."""
    return [end - start for start, end in chunk_regions(dataset)]


def chunk_cache_budget(dataset: Any) -> int | None:
    """The bytes litdata's local cache may hold for a remote ``StreamingDataset`` (None for
    local shards). litdata 0.2.76 resolves it in each reader from the dataset's
    ``max_cache_size``, the ``MAX_CACHE_SIZE`` environment variable, else 75% of the free
    disk under the cache folder (``litdata.utilities.format._resolve_max_cache_size``)."""
    from litdata.utilities.format import _resolve_max_cache_size

    if not dataset.input_dir.url:
        return None
    return _resolve_max_cache_size(dataset.max_cache_size, dataset.input_dir.path)


def view_as_rank(dataset: Any, world_size: int, rank: int) -> Any:
    """Set the rank a ``StreamingDataset`` reads as, always as one node.

    litdata has no public way to say which rank a dataset is read as; its
    ``distributed_env`` attribute holds a ``litdata.utilities.env._DistributedEnv``.
    Why one node: :func:`one_node_view`.
    """
    from litdata.utilities.env import _DistributedEnv

    dataset.distributed_env = _DistributedEnv(world_size, rank, 1)
    return dataset


def samples_of_rank(dataset: Any, num_workers: int, batch_size: int) -> int:
    """Samples the dataset's current rank yields per epoch, by litdata's own rule
    (``StreamingDataset.get_len``: its shuffler's split over ranks and workers)."""
    return dataset.get_len(num_workers, batch_size)


def clear_stale_restore(loader: Any) -> None:
    """After ``load_state_dict`` litdata keeps ``restore=True`` until its iterator runs to
    exhaustion, which Lightning (stopping at the loader's length) never does: the next
    epoch would replay the restored position. The flag has no public setter."""
    if getattr(loader, "restore", False):
        loader.restore = False


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """``StreamingDataLoader.current_epoch``: litdata shuffles with seed + epoch and counts
    epochs itself from 0; a loader rebuilt after an end-of-epoch resume must start at the
    trainer's epoch (litData #775). No public setter."""
    loader.current_epoch = epoch


def loader_state_at(saved: dict, samples: int, batches: int, num_workers: int) -> dict:
    """Another rank's ``StreamingDataLoader.state_dict()`` rewritten to a position of
    ``batches`` batches (``samples`` samples) into this rank's epoch.

    Lightning writes rank 0's loader state only, and litdata's counters are per rank. The
    keys are litdata's state format (0.2.76): samples yielded, the worker that yields
    next (one batch per worker in turn), the dataset's sample position over all ranks.
    """
    state = copy.deepcopy(saved)
    state["num_samples_yielded"] = samples
    state["latest_worker_idx"] = (batches - 1) % max(1, num_workers) if batches else 0
    state["dataset"]["num_samples_yielded"] = samples
    state["dataset"]["sample_in_epoch"] = samples * int(state["dataset"]["world_size"])
    state["dataset"]["current_epoch"] = state["current_epoch"]
    return state


def one_node_view(dataset: Any) -> Any:
    """The rank litdata detected, seen as one node.

    From its second epoch on, litdata (0.2.7x) reshuffles chunks only among the ranks of
    each node when it believes there are several nodes (on GPUs: world size // GPUs per
    node). Chunks that straddle two nodes are then read by both and each node's sample
    count changes: measured with 2 nodes, both trained on the same 96 samples in epoch 2,
    and unequal counts would hang DDP. The one-node view keeps litdata's global per-epoch
    shuffle, every sample once per epoch, on every epoch. Only chunk-cache locality on
    remote data is given up.
    """
    detected = dataset.distributed_env
    return view_as_rank(dataset, detected.world_size, detected.global_rank)
