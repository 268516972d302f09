"""The same number of train batches on every rank: DistributedSampler-style padding.

Without drop_last litdata hands the leftover samples to the last rank (203 samples,
batch 8, 2 ranks: 96 and 107 samples, 12 and 14 batches). A rank that runs out of
batches first would leave the others waiting forever in the gradient all-reduce. As
torch's ``DistributedSampler(drop_last=False)`` does, the short ranks repeat samples:
after their own stream they yield full batches drawn from the whole split, seeded by
(seed, epoch, rank), so every rank steps together and no sample is dropped. The
padding samples are seen twice in that epoch.

Exact resume: the state is litdata's own loader state plus how many batches this
epoch has yielded, so a checkpoint taken while padding resumes inside the padding
instead of starting litdata's next epoch early. Lightning writes rank 0's loader state
only; litdata's counters are per rank (the same on every rank when the split is even,
not here), so each rank rebuilds its own from the batch count all ranks share.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from litdata import StreamingDataLoader, StreamingDataset

from train_template.seam.litdata import loader_state_at


class EvenBatchesLoader:
    """A rank's StreamingDataLoader padded to ``batches_per_epoch`` batches."""

    def __init__(
        self,
        loader: StreamingDataLoader,
        batches_per_epoch: int,
        padding_source: StreamingDataset,
        split_size: int,
    ) -> None:
        """
        Args:
            loader: This rank's own loader; it yields at most ``batches_per_epoch`` batches.
            batches_per_epoch: The most batches any rank's loader yields.
            padding_source: The whole split, read by global index for padding samples.
            split_size: Samples in the whole split (all ranks).

        Padding batches go through the loader's own collate; their draws depend on the
        loader dataset's seed, the epoch and this rank.
        """
        self.loader = loader
        self.batches_per_epoch = batches_per_epoch
        self.own_batches = len(loader)
        self.padding_source = padding_source
        self.split_size = split_size
        self.batches_yielded = 0
        self._restored: int | None = None

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def restore(self) -> bool:
        return self.loader.restore

    @restore.setter
    def restore(self, value: bool) -> None:
        self.loader.restore = value

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        restored, self._restored = self._restored, None
        if restored and self.own_batches <= restored < self.batches_per_epoch:
            # Saved while padding: the inner loader's state is its finished epoch, and
            # iterating it now would start its next epoch early.
            self.batches_yielded = restored
        else:
            # A fresh epoch, or a resume inside the own stream (litdata skips ahead).
            mid_stream = restored is not None and restored < self.own_batches
            self.batches_yielded = restored if mid_stream else 0
            for batch in self.loader:
                self.batches_yielded += 1  # counted before the yield, like litdata's own state
                yield batch
        first = self.batches_yielded - self.own_batches
        for pad_index in range(first, self.batches_per_epoch - self.own_batches):
            self.batches_yielded += 1
            yield self.padding_batch(pad_index)

    def padding_batch(self, pad_index: int) -> Any:
        """The ``pad_index``-th padding batch of this rank's current epoch (deterministic)."""
        batch_size = int(self.batch_size or 1)
        needed = (self.batches_per_epoch - self.own_batches) * batch_size
        dataset = self.loader.dataset
        seed = [dataset.seed, self.loader.current_epoch, dataset.distributed_env.global_rank]
        draws = np.random.default_rng(seed).choice(
            self.split_size, needed, replace=needed > self.split_size
        )
        ids = draws[pad_index * batch_size : (pad_index + 1) * batch_size]
        return self.loader.collate_fn([self.padding_source[int(i)] for i in ids])

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batches_yielded" not in state:
            # A checkpoint of a run whose ranks were not padded (another world size):
            # restore it as saved; the plan check then refuses the changed world size.
            self.loader.load_state_dict(state)
            return
        yielded = int(state["batches_yielded"])
        self.loader.load_state_dict(self.own_loader_state(state["loader"], yielded))
        self._restored = yielded

    def own_loader_state(self, saved: dict[str, Any], batches_yielded: int) -> dict[str, Any]:
        """Another rank's litdata loader state, rewritten to this rank's position.

        litdata counts ``batch_size`` samples per batch yielded (the short last batch
        included) and cycles through its workers one batch each; a rank whose stream
        already ended has its dataset's epoch moved on, which must not leak to a rank
        still inside it.
        """
        own = min(batches_yielded, self.own_batches)
        samples = own * int(self.batch_size or 1)
        return loader_state_at(saved, samples, own, self.loader.num_workers)
