"""The train split as litdata's own stream (``--data.global_order false``): chunk by
chunk, for data too large to read out of order; a resume must keep the layout.

litdata splits the stream over ranks itself; where that split is uneven (no drop_last)
``even_batches.EvenBatchesLoader`` pads the short ranks, so every rank yields the same
number of batches. The loader's epoch counter is aligned with the trainer's, so that
resuming from an end-of-epoch checkpoint shuffles the next epoch as the uninterrupted
run would (a fresh loader would otherwise replay epoch 1's order; litData #775).
"""

from __future__ import annotations

from typing import Any

from litdata import StreamingDataLoader, StreamingDataset

from train_template.errors import UserError
from train_template.even_batches import EvenBatchesLoader
from train_template.layout import TrainLayout, train_layout
from train_template.seam.litdata import (
    one_node_view,
    samples_of_rank,
    set_loader_epoch,
    view_as_rank,
)
from train_template.seam.loop import epochs_started

# The settings that fix which samples come in which order in litdata's own stream (with
# batch_size, which the plan holds anyway): a resume must keep them (resume.RESUME_KEYS).
ORDER_SETTINGS = ("shuffle", "drop_last", "seed", "num_workers", "global_order")


class LitdataStreamTrain:
    """``StreamingDataModule``'s train loader as litdata's own stream, short ranks padded."""

    reads_by_index = False

    def __init__(self, data: Any) -> None:
        self.data = data  # the StreamingDataModule
        self._layout: TrainLayout | None = None  # of the current world size, from setup

    def prepare(self, dataset: StreamingDataset) -> StreamingDataset:
        """The train dataset as litdata detected this rank, one node (``one_node_view``)."""
        return one_node_view(dataset)

    def setup(self) -> None:
        """Every rank's batch count, computed identically on every rank, so they all make
        the same decision here and pad to the same length later."""
        data = self.data
        world_size = data.datasets["train"].distributed_env.world_size
        self._layout = self.layout(world_size)
        # Lightning would silently skip training on an empty epoch; a rank left with
        # none while others have some is padded instead.
        if self._layout.batches_per_rank == 0:
            raise UserError(
                f"the train split has {data.split_size('train')} samples: split over {world_size} "
                f"rank(s) that is fewer than one batch of --data.batch_size={data.batch_size} per "
                "rank with --data.drop_last true: use a smaller batch size, fewer devices, more "
                "data, or --data.drop_last false"
            )

    def loader(self) -> StreamingDataLoader | EvenBatchesLoader:
        data = self.data
        loader = data.stream_loader("train")
        if data.trainer is not None:
            # StreamingDataLoader counts epochs itself (+1 per iteration) and shuffles with
            # seed + epoch; a loader rebuilt after an end-of-epoch resume starts at 0. Start
            # it at the trainer's epoch; mid-epoch resumes overwrite this from the state.
            set_loader_epoch(loader, epochs_started(data.trainer))
        layout = self._layout
        if layout is None or len(set(layout.rank_batches)) <= 1:
            return loader
        return EvenBatchesLoader(
            loader,
            batches_per_epoch=layout.batches_per_rank,
            padding_source=data.make_dataset("train"),
            split_size=data.split_size("train"),
        )

    def layout(self, world_size: int, accumulate_grad_batches: int = 1) -> TrainLayout:
        """What each rank's own loader yields at ``world_size``: litdata itself is asked
        (its shuffler's length under each rank's view), so it is the same computation the
        real ranks make, for world sizes this machine does not have too. The counts are
        the same every epoch: litdata's single-node assignment only permutes chunks."""
        if self._layout is not None and self._layout.world_size == world_size:
            return self._layout
        data = self.data
        # One process needs no other rank's view: its own dataset answers. Other world
        # sizes get a dataset of their own, so the real one keeps its rank.
        own = data.datasets.get("train") if world_size == 1 else None
        dataset = own if own is not None else data.make_dataset("train")
        samples = []
        for rank in range(world_size):
            view_as_rank(dataset, world_size, rank)
            samples.append(samples_of_rank(dataset, data.num_workers, data.batch_size))
        return train_layout(
            data.batch_size,
            samples,
            drop_last=data.drop_last,
            tokens_per_sample=getattr(data, "tokens_per_sample", None),
            order=tuple((name, getattr(data, name)) for name in ORDER_SETTINGS),
        )
