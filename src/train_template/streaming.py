"""The litdata plumbing every streaming data module shares: ``StreamingDataModule``.

A task's data module subclasses it and says only what is task-specific: how samples
become a batch (``collate``), how a batch is finished on the device
(``on_after_batch_transfer``) and, for token data, the ``item_loader``
(``litdata.TokensLoader``). Everything that makes the stream exact lives here.

Datasets are built in ``setup()``, never in ``__init__``: litdata reads the world
size when a dataset is constructed, and one built before the process group exists
gives every rank the same data (litData #411).

The train loader is one of two classes, chosen by ``--data.global_order``: the items
read by index in the template's global sample order (``stream_items.GlobalOrderTrain``,
the default: exact and resumable on any layout), or litdata's own stream
(``litdata_stream.LitdataStreamTrain``: chunk by chunk, resumable on the same layout).
Validation, test and predict read litdata's stream.

Shuffling is only as good as the chunks: litdata permutes the chunks, then the samples
inside each chunk, so a loader draws one chunk's samples before the next. Write data
that is not already in random order as many small chunks of mixed content
(e.g. 4 KB pieces of text files in shuffled order, 32k-token chunks); one chunk per
topic trains on one topic at a time.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from litdata import StreamingDataLoader, StreamingDataset
from torch.utils.data import DataLoader

from train_template import storage
from train_template.errors import UserError
from train_template.eval_loaders import evaluation_loader, prediction_loader
from train_template.even_batches import EvenBatchesLoader
from train_template.layout import TrainLayout
from train_template.litdata_stream import LitdataStreamTrain
from train_template.seam.litdata import (
    allow_plain_http_object_store,
    one_cache_writer,
    one_node_view,
    samples_of_rank,
    view_as_rank,
)
from train_template.shards import SPLITS
from train_template.stream_items import GlobalOrderTrain, owned_bytes


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
        global_order: bool = True,
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
            global_order: Train in one sample order defined over global positions
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
        self.global_order = global_order
        self.storage_options = dict(storage_options or {})
        self.datasets: dict[str, StreamingDataset] = {}
        train = GlobalOrderTrain if global_order else LitdataStreamTrain
        self.train_source: GlobalOrderTrain | LitdataStreamTrain = train(self)

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
        return sum(chunk["chunk_size"] for chunk in self.split_chunks(split))

    def split_bytes(self, split: str) -> int:
        """Bytes of a split's chunks, from its litdata index."""
        return sum(chunk["chunk_bytes"] for chunk in self.split_chunks(split))

    def split_chunks(self, split: str) -> list[dict]:
        index = json.loads(
            storage.read_text(f"{self.split_dir(split)}/index.json", self.storage_options) or "{}"
        )
        return index["chunks"]

    def make_dataset(self, split: str) -> StreamingDataset:
        training = split == "train"
        by_index = training and self.train_source.reads_by_index
        split_dir = self.split_dir(split)
        self.check_shards(split_dir)
        remote = storage.is_url(split_dir)
        if remote:
            allow_plain_http_object_store(self.storage_options.get("endpoint_url"))
        try:
            with one_cache_writer(split_dir) if remote else contextlib.nullcontext():
                dataset = StreamingDataset(
                    split_dir,
                    # Read by index, litdata's own shuffle and drop_last stay off.
                    shuffle=self.shuffle and training and not by_index,
                    # Always explicit: litdata would otherwise force drop_last on in DDP.
                    drop_last=self.drop_last and training and not by_index,
                    seed=self.seed,
                    item_loader=self.item_loader(),
                    storage_options=self.storage_options,
                    transform=owned_bytes,
                    # Read by index, litdata's default decodes a window of ~250 neighbours
                    # per read and keeps one: 0.36 ms an item, against per-item decoding
                    # (docs/benchmarks.md section 3).
                    **({"batch_decode": 0} if by_index else {}),
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
        return self.train_source.prepare(dataset) if training else one_node_view(dataset)

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
        if stage == "fit":
            self.train_source.setup()

    def check_every_rank_evaluates(self, split: str) -> None:
        """litdata hands each rank whole batches and the rest to the last rank: a small
        split on many ranks leaves some ranks none, and Lightning stops deep in its loop
        ("within local rank has zero length"). Say which setting to change instead."""
        world_size = self.datasets[split].distributed_env.world_size
        if world_size == 1:
            return
        dataset = self.make_dataset(split)  # its own copy: the real one keeps its rank
        for rank in range(world_size):
            view_as_rank(dataset, world_size, rank)
            if samples_of_rank(dataset, self.num_workers, self.batch_size) == 0:
                raise UserError(
                    f"the '{split}' split has {self.split_size(split)} samples: litdata gives "
                    f"each of {world_size} ranks whole batches of --data.batch_size="
                    f"{self.batch_size}, which leaves rank {rank} none: use a smaller batch "
                    f"size, fewer devices, or more '{split}' data"
                )

    @property
    def pins_memory(self) -> bool:
        """Page-locked batches let Lightning's non_blocking host-to-GPU copy overlap with
        compute; on a CPU run pinning would only cost a copy."""
        accelerator = self.trainer.accelerator if self.trainer is not None else None
        return isinstance(accelerator, CUDAAccelerator)

    def stream_loader(self, split: str) -> StreamingDataLoader:
        """litdata's stream of ``split`` (evaluation, and training with ``global_order`` off)."""
        training = split == "train"
        return StreamingDataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=self.shuffle and training,
            drop_last=self.drop_last and training,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0 and training,
            pin_memory=self.pins_memory,
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

    def train_dataloader(self) -> DataLoader | StreamingDataLoader:
        return self.train_source.loader()

    def val_dataloader(self) -> StreamingDataLoader | EvenBatchesLoader:
        return evaluation_loader(self, "val")

    def test_dataloader(self) -> StreamingDataLoader | EvenBatchesLoader:
        return evaluation_loader(self, "test")

    def predict_dataloader(self) -> StreamingDataLoader:
        return prediction_loader(self)

    def train_layout(self, world_size: int, accumulate_grad_batches: int = 1) -> TrainLayout:
        """What each rank's own train loader yields at ``world_size`` (the plan's input),
        from the shards' metadata, for world sizes this machine does not have too."""
        return self.train_source.layout(world_size, accumulate_grad_batches)
