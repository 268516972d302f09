"""The local copies of remote chunks that the global order reads by index: the windows
in use, not the whole split, so that a node downloads each chunk about once per epoch with
a cache far smaller than the dataset.

litdata (0.2.76) decides for its own stream what its cache folder keeps: past its budget
it deletes a chunk as soon as a read moves to another one. Reads by index move between
the chunks of a window all the time, so under that rule one permutation of all samples
downloaded 62.6x the split and the blockwise order stalled (docs/benchmarks.md 10d). For
reads by index the template owns the cache instead: litdata's reader keeps what it
downloads (``seam.litdata.keep_downloaded_chunks``), and each rank's sampler, whenever
its reads enter another window, has :class:`WindowCache` remove the chunk files outside
the windows in use (``GlobalOrder.blocks_in_use``: the current window and the one
before, which loader workers and the other ranks, a few micro-batches behind, may still
read). It also does the downloads, before each micro-batch is read (:meth:`WindowCache.fetch`). All ranks and workers of a node share litdata's cache folder; every rank removes
the same files (a second removal finds nothing), and a removed chunk that a straggler
still needs is downloaded again, never read half-written (litdata publishes a download
by rename; a reader's open map of a removed file stays valid).

A split that fits the budget is never evicted: its chunks are downloaded once per run.
A budget smaller than the windows in use is refused in one line before the first step.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from train_template.errors import UserError
from train_template.seam.litdata import chunk_cache_budget, chunk_downloader, chunk_files
from train_template.storage import file_lock, size_text


class WindowCache:
    """The cache folder of one remote split read by index."""

    def __init__(self, dataset: Any, where: str, chunks: list[dict]) -> None:
        self.dataset = dataset  # budget resolved at the first call, as litdata's reader does
        self.where = where
        self.folder, self.files = chunk_files(dataset)
        by_name = {chunk["filename"]: chunk for chunk in chunks}  # litdata's index entries
        self.chunks = [by_name[name] for name in self.files]
        self.sizes = np.array([chunk["chunk_bytes"] for chunk in self.chunks], dtype=np.int64)
        self.number_of = {name: number for number, name in enumerate(self.files)}
        self.evicts: bool | None = None  # decided at the first call
        self._downloader: tuple[int, Any] | None = None  # (process id, litdata's downloader)

    def fetch(self, numbers: Any) -> None:
        """Download the chunks ``numbers`` that this machine does not hold yet, before a
        read needs them. One process of the machine downloads a chunk while the others
        wait on its lock and then find it. litdata's own download thread, left to do this,
        lets the losing process poll for the winner's file in steps of a second
        (``_wait_until_chunk_ready``): measured, 2 loader workers read a third as fast as
        one process."""
        for number in numbers:
            path = os.path.join(self.folder, self.files[number])
            if os.path.exists(path):
                continue
            with file_lock(path + ".fetch"):
                if not os.path.exists(path):
                    self.downloader().download_chunk_from_index(int(number))

    def downloader(self) -> Any:
        """litdata's downloader of this split, one per process (its store client is)."""
        if self._downloader is None or self._downloader[0] != os.getpid():
            made = chunk_downloader(self.dataset, self.folder, self.chunks)
            self._downloader = (os.getpid(), made)
        return self._downloader[1]

    def keep(self, chunks: np.ndarray | None, most: int) -> None:
        """Remove the cached chunk files other than ``chunks`` (None: keep every chunk);
        ``most``: how many chunks the order ever keeps at once, checked at the first call."""
        if self.evicts is None:
            self.evicts = self.check(most)
        if not self.evicts or chunks is None:
            return
        kept = set(chunks.tolist())
        for name in os.listdir(self.folder):
            number = self.number_of.get(name)
            if number is not None and number not in kept:
                try:
                    os.remove(os.path.join(self.folder, name))
                except FileNotFoundError:
                    pass  # another rank of this node removed it first

    def check(self, most: int) -> bool:
        """Whether chunks must be removed (the split exceeds litdata's cache budget);
        refused where the ``most`` largest chunks do not fit the budget either."""
        budget = chunk_cache_budget(self.dataset)
        if budget is None or int(self.sizes.sum()) <= budget:
            return False
        needed = int(np.sort(self.sizes)[::-1][:most].sum())
        if needed > budget:
            raise UserError(
                f"the global order keeps up to {most} of the {len(self.files)} chunks of "
                f"the train split at {self.where} cached at once ({size_text(needed)}: the "
                "windows in use of --plan.shuffle_window) but litdata's local chunk cache may hold "
                f"{size_text(budget)} (MAX_CACHE_SIZE, else 75% of the free disk): use a "
                "smaller --plan.shuffle_window, raise MAX_CACHE_SIZE or free disk space"
            )
        return True
