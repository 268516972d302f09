"""The litdata plumbing every streaming data module shares: ``StreamingDataModule``.

A task's data module subclasses it and says only what is task-specific: how samples
become a batch (``collate``), how a batch is finished on the device
(``on_after_batch_transfer``) and, for token data, the ``item_loader``
(``litdata.TokensLoader``). Everything that makes the stream exact lives here.

Datasets are built in ``setup()``, never in ``__init__``: litdata reads the world
size when a dataset is constructed, and one built before the process group exists
gives every rank the same data (litData #411).

Exact resume relies on two things here: Lightning saves and restores the
StreamingDataLoader's state for mid-epoch checkpoints, and ``train_dataloader``
aligns the loader's epoch counter with the trainer's, so that resuming from an
end-of-epoch checkpoint shuffles the next epoch as the uninterrupted run would
(a fresh loader would otherwise replay epoch 1's order; litData #775).

Every rank yields the same number of train batches: where litdata's split is uneven
(no drop_last), ``even_batches.EvenBatchesLoader`` pads the short ranks.

Shuffling is only as good as the chunks: litdata permutes the chunks, then the samples
inside each chunk, so a loader draws one chunk's samples before the next. Write data
that is not already in random order as many small chunks of mixed content (the LM
example: 4 KB pieces of files in shuffled order, 32k-token chunks); one chunk per
topic trains on one topic at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from litdata import StreamingDataLoader, StreamingDataset
from torch.utils.data import DataLoader, Dataset

from train_template import seam, storage
from train_template.elastic import loader_layout
from train_template.errors import UserError
from train_template.even_batches import EvenBatchesLoader
from train_template.plan import TrainLayout
from train_template.shards import SPLITS

# The settings that fix which samples come in which order in litdata's own stream
# (--data.elastic false; with batch_size, which the plan holds anyway): a resume must
# keep them (plan.RESUME_KEYS). In the global order the workers only share the work.
ORDER_SETTINGS = ("shuffle", "drop_last", "seed", "num_workers", "elastic")


class StreamingDataModule(pl.LightningDataModule):
    """Train/val/test/predict loaders over litdata shards (``<data_dir>/{train,val,test}``).

    Subclasses override :meth:`collate` (and :meth:`item_loader` for token data).
    :meth:`train_layout` (each rank's batches and samples at any world size, from the
    shards' metadata, without building a loader) is what the training plan reads before
    ``configure_optimizers``, and what the ``plan`` command reads for other world sizes.
    """

    # The command that builds this module's shards (``{data_dir}`` is filled in), named
    # in the errors for missing or damaged shards; None: the user brings their own.
    prepare_command: str | None = None

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 42,
        predict_split: str = "test",
        elastic: bool = True,
        storage_options: dict | None = None,
    ) -> None:
        """
        Args:
            data_dir: Root of the optimized shards (``train/``, ``val/``, ``test/``); a local
                path or a URL litdata understands.
            batch_size: Samples per batch on each device.
            num_workers: DataLoader worker processes per device (0 loads in the main process).
            shuffle: Shuffle the training data, differently each epoch.
            drop_last: Drop the last, incomplete batch of each rank's training epoch.
            seed: Seed of the training shuffle (litdata adds the epoch to it).
            predict_split: Which split ``predict`` runs on.
            elastic: Train in one sample order defined over global positions
                (``order.GlobalOrder``): every optimizer step trains on the same samples on
                any layout, so a checkpoint resumes on another number of devices or nodes.
                ``false``: litdata's own stream (reads chunk by chunk; a resume must keep
                the layout).
            storage_options: For a ``data_dir`` URL: litdata's ``storage_options`` (boto3
                client arguments such as ``endpoint_url``, ``aws_access_key_id``,
                ``aws_secret_access_key``, ``verify``); default: the ``AWS_*`` variables.
        """
        super().__init__()
        if batch_size < 1:
            raise UserError(f"--data.batch_size={batch_size}: the batch size must be at least 1")
        if num_workers < 0:
            raise UserError(f"--data.num_workers={num_workers}: use 0 or more workers")
        if predict_split not in SPLITS:
            raise UserError(f"--data.predict_split={predict_split!r}: use one of {SPLITS}")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.predict_split = predict_split
        self.elastic = elastic
        self.storage_options = dict(storage_options or {})
        self.datasets: dict[str, StreamingDataset] = {}
        self._layout: TrainLayout | None = None  # of the current world size, from setup

    def _how_to(self, action: str) -> str:
        if self.prepare_command is None:
            return f"{action} the litdata shards, or point --data.data_dir at them"
        command = self.prepare_command.format(data_dir=self.data_dir)
        if action == "rebuild":
            return f"rebuild the shards with `{command} --force`"
        return f"run `{command}` or point it at your shards"

    def split_dir(self, split: str) -> str:
        if storage.is_url(self.data_dir):
            url = f"{self.data_dir.rstrip('/')}/{split}"
            if storage.read_text(f"{url}/index.json", self.storage_options) is None:
                raise UserError(
                    f"--data.data_dir={self.data_dir} holds no litdata shards for '{split}' "
                    f"(no {split}/index.json): {self._how_to('build')}"
                )
            return url
        path = Path(self.data_dir)
        if not path.is_dir():
            raise UserError(
                f"--data.data_dir={self.data_dir} does not exist: {self._how_to('build')}"
            )
        if not (path / split / "index.json").is_file():
            raise UserError(
                f"--data.data_dir={self.data_dir} holds no litdata shards for '{split}' "
                f"(no {split}/index.json): {self._how_to('build')}"
            )
        return str(path / split)

    def check_shards(self, split_dir: str) -> None:
        """Catch missing or truncated chunk files before training instead of mid-epoch."""
        if "://" in split_dir:
            return
        try:
            index = json.loads((Path(split_dir) / "index.json").read_text())
            chunks = index["chunks"]
        except (json.JSONDecodeError, KeyError, OSError) as error:
            raise UserError(
                f"{split_dir}/index.json is unreadable ({error}): {self._how_to('rebuild')}"
            ) from None
        for chunk in chunks:
            path = Path(split_dir) / chunk["filename"]
            size = path.stat().st_size if path.is_file() else -1
            if size != chunk["chunk_bytes"]:
                found = "missing" if size < 0 else f"{size} bytes, expected {chunk['chunk_bytes']}"
                raise UserError(f"shard {path} is corrupt ({found}): {self._how_to('rebuild')}")

    def split_size(self, split: str) -> int:
        """Samples in a split, from its litdata index (before sharding and drop_last)."""
        index = json.loads(
            storage.read_text(f"{self.split_dir(split)}/index.json", self.storage_options) or "{}"
        )
        return sum(chunk["chunk_size"] for chunk in index["chunks"])

    def make_dataset(self, split: str) -> StreamingDataset:
        # In the global order litdata only reads items by index: its own shuffle and
        # drop_last stay off, the order decides.
        training = split == "train" and not self.elastic
        split_dir = self.split_dir(split)
        self.check_shards(split_dir)
        remote = storage.is_url(split_dir)
        if remote:
            seam.allow_plain_http_object_store(self.storage_options.get("endpoint_url"))
        try:
            with seam.one_cache_writer(split_dir) if remote else contextlib.nullcontext():
                dataset = StreamingDataset(
                    split_dir,
                    shuffle=self.shuffle and training,
                    # Always explicit: litdata would otherwise force drop_last on in DDP.
                    drop_last=self.drop_last and training,
                    seed=self.seed,
                    item_loader=self.item_loader(),
                    storage_options=self.storage_options,
                    transform=owned_bytes,
                    # Read by index (the global order), litdata's default decodes a window of
                    # ~250 neighbours per read and keeps one: 0.36 ms an item, against
                    # per-item decoding (docs/benchmarks.md section 3).
                    **({"batch_decode": 0} if split == "train" and self.elastic else {}),
                )
        except (ValueError, FileNotFoundError, json.JSONDecodeError, KeyError) as error:
            raise UserError(
                f"--data.data_dir={self.data_dir}: cannot read the '{split}' shards ({error}); "
                f"{self._how_to('rebuild')}"
            ) from None
        if len(dataset) == 0:
            raise UserError(
                f"--data.data_dir={self.data_dir}: the '{split}' split is empty: prepare it with more data"
            )
        # From its second epoch on, litdata (0.2.7x) reshuffles chunks only among the ranks
        # of each node when it believes there are several nodes (on GPUs: world size //
        # GPUs per node). Chunks that straddle two nodes are then read by both and each
        # node's sample count changes: measured with 2 nodes, both trained on the same 96
        # samples in epoch 2, and unequal counts would hang DDP. The one-node view keeps
        # litdata's global per-epoch shuffle, every sample once per epoch, on every epoch.
        # Only chunk-cache locality on remote data is given up.
        detected = dataset.distributed_env
        if split == "train" and self.elastic:  # read by index: every rank sees every item
            seam.read_whole_chunks(dataset)
            return seam.view_as_rank(dataset, 1, 0)
        return seam.view_as_rank(dataset, detected.world_size, detected.global_rank)

    def setup(self, stage: str) -> None:
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (self.predict_split,),
        }[stage]
        for split in needed:
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)
                if split != "train":
                    self.check_every_rank_evaluates(split)
        if stage != "fit" or self.elastic:  # the global order: the plan checks its batches
            return
        # Every rank's batch count, computed identically on every rank, so they all
        # make the same decision here and pad to the same length later.
        world_size = self.datasets["train"].distributed_env.world_size
        self._layout = self.train_layout(world_size)
        # Lightning would silently skip training on an empty epoch; a rank left with
        # none while others have some is padded instead.
        if self._layout.batches_per_rank == 0:
            raise UserError(
                f"the train split has {self.split_size('train')} samples: split over {world_size} "
                f"rank(s) that is fewer than one batch of --data.batch_size={self.batch_size} per "
                "rank with --data.drop_last true: use a smaller batch size, fewer devices, more "
                "data, or --data.drop_last false"
            )

    def check_every_rank_evaluates(self, split: str) -> None:
        """litdata hands each rank whole batches and the rest to the last rank: a small
        split on many ranks leaves some ranks none, and Lightning stops deep in its loop
        ("within local rank has zero length"). Say which setting to change instead."""
        world_size = self.datasets[split].distributed_env.world_size
        if world_size == 1:
            return
        dataset = self.make_dataset(split)  # its own copy: the real one keeps its rank
        for rank in range(world_size):
            seam.view_as_rank(dataset, world_size, rank)
            if seam.samples_of_rank(dataset, self.num_workers, self.batch_size) == 0:
                raise UserError(
                    f"the '{split}' split has {self.split_size(split)} samples: litdata gives "
                    f"each of {world_size} ranks whole batches of --data.batch_size="
                    f"{self.batch_size}, which leaves rank {rank} none: use a smaller batch "
                    f"size, fewer devices, or more '{split}' data"
                )

    def _loader(self, split: str, dataset: StreamingDataset | None = None) -> StreamingDataLoader:
        training = split == "train"
        accelerator = self.trainer.accelerator if self.trainer is not None else None
        return StreamingDataLoader(
            dataset if dataset is not None else self.datasets[split],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=self.shuffle and training,
            drop_last=self.drop_last and training,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0 and training,
            # Page-locked batches let Lightning's non_blocking host-to-GPU copy overlap
            # with compute; on a CPU run pinning would only cost a copy.
            pin_memory=isinstance(accelerator, CUDAAccelerator),
            # Its own generator: each iter() of a DataLoader otherwise draws a seed from
            # the global torch RNG, which would shift dropout after an epoch-end resume.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def item_loader(self) -> Any:
        """litdata's item loader (``None``: its default; ``TokensLoader`` for token data)."""
        return None

    def collate(self, samples: list[Any]) -> Any:
        """Turn a list of samples into a batch (torch's default collate here)."""
        return torch.utils.data.default_collate(samples)

    def train_dataloader(self) -> DataLoader | StreamingDataLoader | EvenBatchesLoader:
        if self.elastic:
            return self._items_loader()
        loader = self._loader("train")
        if self.trainer is not None:
            # StreamingDataLoader counts epochs itself (+1 per iteration) and shuffles with
            # seed + epoch. A loader rebuilt after an end-of-epoch resume starts at 0; start
            # it at the trainer's epoch so epoch k+1 gets epoch k+1's order. Mid-epoch
            # resumes overwrite this from the checkpoint's loader state.
            seam.set_loader_epoch(loader, seam.epochs_started(self.trainer))
        layout = self._layout
        if layout is None or len(set(layout.rank_batches)) <= 1:
            return loader
        return EvenBatchesLoader(
            loader,
            batches_per_epoch=layout.batches_per_rank,
            padding_source=self.make_dataset("train"),
            split_size=self.split_size("train"),
        )

    def _items_loader(self) -> DataLoader:
        """The train items as a plain map-style loader: the template trains it in the global
        order (``elastic.py``), as it trains any user's ``DataLoader(dataset, shuffle=True)``."""
        if "train" not in self.datasets:
            self.datasets["train"] = self.make_dataset("train")
        accelerator = self.trainer.accelerator if self.trainer is not None else None
        return DataLoader(
            ItemsOf(self.datasets["train"]),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=isinstance(accelerator, CUDAAccelerator),
            generator=torch.Generator().manual_seed(self.seed),  # the order's seed
        )

    def val_dataloader(self) -> StreamingDataLoader:
        return self._loader("val")

    def test_dataloader(self) -> StreamingDataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> StreamingDataLoader:
        return self._loader(self.predict_split)

    def train_layout(self, world_size: int, accumulate_grad_batches: int = 1) -> TrainLayout:
        """What each rank's own train loader yields at ``world_size`` (the plan's input).

        It asks litdata itself (its shuffler's length under each rank's view) and turns
        samples into batches with ``StreamingDataLoader.__len__``'s rule, so it is the
        same computation the real ranks make, for world sizes this machine does not have
        too. The counts are the same every epoch: litdata's single-node assignment only
        permutes which chunks go where.
        """
        if self.elastic:  # every rank: whole global batches of the global order
            tokens = getattr(self, "tokens_per_sample", None)
            layout = loader_layout(
                self._items_loader(), world_size, accumulate_grad_batches, tokens
            )
            assert layout is not None, "a plain shuffled or sequential loader"
            return layout
        if self._layout is not None and self._layout.world_size == world_size:
            return self._layout
        # One process needs no other rank's view: its own dataset answers. Other world
        # sizes get a dataset of their own, so the real one keeps its rank.
        own = self.datasets.get("train") if world_size == 1 else None
        dataset = own if own is not None else self.make_dataset("train")
        batches, samples = [], []
        for rank in range(world_size):
            seam.view_as_rank(dataset, world_size, rank)
            count = seam.samples_of_rank(dataset, self.num_workers, self.batch_size)
            full, partial = divmod(count, self.batch_size)
            batches.append(full + int(partial > 0 and not self.drop_last))
            samples.append(count)
        return TrainLayout(
            batch_size=self.batch_size,
            rank_batches=tuple(batches),
            rank_samples=tuple(samples),
            tokens_per_sample=getattr(self, "tokens_per_sample", None),
            order=tuple((name, getattr(self, name)) for name in ORDER_SETTINGS),
        )


def owned_bytes(item: Any) -> Any:
    """A sample with its ``bytes`` fields as ``bytes``, the type they were written as.

    litdata (0.2.76) returns a ``bytes`` field as a ``memoryview`` into the chunk whenever
    it reads from a memory-mapped chunk (local shards, and every chunk read by index,
    ``seam.map_every_chunk``). A view cannot be pickled: a collate that passes it on
    makes a loader worker fail to send its batch, which torch only prints in the worker
    while the main process waits for that batch for ever; it also pins the chunk's map.
    One copy per field (3 KB: well under a microsecond) removes both. Lightning's
    ``apply_to_collection`` does the same walk generically at 10x the cost (5.7 against
    0.55 us a digits sample), a third of the loader's time per sample.
    """
    kind = type(item)
    if kind is dict:  # litdata's usual sample: a fresh dict per read, changed in place
        for key, value in item.items():
            if type(value) in _CONTAINERS:
                item[key] = owned_bytes(value)
        return item
    if kind is memoryview:
        return item.tobytes()
    if isinstance(item, list):
        return [owned_bytes(value) for value in item]
    if isinstance(item, tuple):
        values = [owned_bytes(value) for value in item]
        return kind(*values) if hasattr(item, "_fields") else kind(values)
    return item


_CONTAINERS = frozenset({memoryview, dict, list, tuple})


class ItemsOf(Dataset):
    """A ``StreamingDataset`` read by index (``dataset[i]``): a map-style dataset, so that
    the train loader can take the global order's sampler."""

    def __init__(self, dataset: StreamingDataset) -> None:
        self.dataset = dataset
        self.length = len(dataset)  # every item: read as one rank, no shuffle, no drop
        self.mapped_in: int | None = None  # the process whose reader maps every chunk

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """A whole micro-batch (torch's loader asks for it in one call): read in index
        order, i.e. chunk by chunk and in file order within a chunk, and returned in the
        order asked for. litdata pays for every switch of chunk (a round trip through its
        download thread for remote data, a page read locally); a random batch read in
        its own order switches at almost every item."""
        ordered = sorted(set(indices))
        items = {ordered[0]: self.dataset[ordered[0]]}
        if self.mapped_in != os.getpid():  # litdata's reader exists after a read, per process
            self.mapped_in = os.getpid()
            seam.map_every_chunk(self.dataset)
        items.update((index, self.dataset[index]) for index in ordered[1:])
        return [items[index] for index in indices]
