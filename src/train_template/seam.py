"""The one seam with Lightning's, litdata's and jsonargparse's internals.

Every private name the template touches is used here and nowhere else, so an upgrade
means reading this one file (and running the suite). Each entry says why no public
API serves. Checked against the pinned versions: lightning 2.6.6, litdata 0.2.76,
jsonargparse 4.x (``uv.lock``).

The rest of the machinery, and the examples, call the public functions below.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# -- Lightning: the process group -----------------------------------------------------


def set_collective_timeout(strategy: Any, seconds: float) -> bool:
    """The process group's timeout on an instantiated strategy; False when it has none.

    DDP, FSDP, ModelParallel and DeepSpeed (lightning 2.6.6) take ``timeout`` only in
    ``__init__`` and keep it as ``_timeout`` until ``setup_environment`` opens the group;
    a strategy given by name (``strategy: ddp``) is built by the Trainer, so setting it
    after the Trainer is made is the one place that serves every way of naming it.
    """
    from datetime import timedelta

    if not hasattr(strategy, "_timeout"):
        return False  # one process: no group, nothing to wait for
    strategy._timeout = timedelta(seconds=seconds)
    return True


# -- Lightning: the training loop's length ------------------------------------------


def limited_batches(length: int | float, limit: int | float | None) -> int | float:
    """Batches per epoch after ``limit_train_batches``, by Lightning's own rule.

    ``_parse_num_batches`` (lightning 2.6.6, trainer/connectors/data_connector.py) is the
    function the fit loop applies; its rounding and its errors for fractions that leave
    no batch are what a plan must match, and it has no public equivalent.
    """
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage

    return _parse_num_batches(RunningStage.TRAINING, length, 1.0 if limit is None else limit)


def release_step_limit(trainer: pl.Trainer, max_epochs: int) -> None:
    """At setup: the plan's epochs as Lightning's epoch limit, and no step limit yet.

    While ``epoch_loop.max_steps != -1`` during the checkpoint restore, Lightning
    restores its loops as "iteration-based" and counts an end-of-epoch checkpoint's epoch
    twice (the resumed run stops an epoch early). The Trainer reads ``max_epochs`` and
    ``max_steps`` only in ``__init__``; the loops' attributes are the only handle after it.
    """
    trainer.fit_loop.max_epochs = max_epochs
    trainer.fit_loop.epoch_loop.max_steps = -1


def set_step_limit(trainer: pl.Trainer, max_steps: int) -> None:
    """At train start (checkpoint restored): stop exactly at the plan's last step."""
    trainer.fit_loop.epoch_loop.max_steps = max_steps


def batch_index(trainer: pl.Trainer) -> int:
    """The index of the current batch in its epoch (``epoch_loop.batch_idx``): the
    optimizer hooks are not handed it."""
    return trainer.fit_loop.epoch_loop.batch_idx


def epochs_started(trainer: pl.Trainer) -> int:
    """Epochs whose training began (``fit_loop.epoch_progress.current.processed``), the
    count a rebuilt loader's epoch must start at; ``current_epoch`` lags it at epoch end."""
    return trainer.fit_loop.epoch_progress.current.processed


def is_logging_step(trainer: pl.Trainer) -> bool:
    """True on the training batches whose ``self.log`` values Lightning writes (every
    ``log_every_n_steps``, and the last one); it drops the values of the others.

    A public function for any module: logging only here saves about 0.3 ms per
    ``self.log`` call on the other steps. Lightning's own LearningRateMonitor makes this
    same check through ``trainer._logger_connector.should_update_logs`` (no public name).
    """
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def rescale_batch_progress(checkpoint: dict, saved_accumulation: int, accumulation: int) -> None:
    """Lightning's batch counters count micro-batches: a checkpoint resumed with another
    accumulation (same global batch, another layout) must count in the new unit, or the
    optimizer would step off its windows and the epoch would end at the wrong batch.

    The counters live under Lightning's loop-state keys (``epoch_loop.batch_progress``);
    a checkpoint of the global order is taken at a window boundary, so ``processed`` is a
    whole multiple of the saved accumulation. The other counters keep their distance
    from it: a save in ``on_train_batch_end`` has ``completed == processed - 1``, which
    is how Lightning 2.6.6 (``_TrainingEpochLoop.update_restart_stage``) knows that batch
    finished; scaling that lag too made a save on an epoch's last batch train one
    window of the finished epoch again.
    """
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        counters = progress[part]
        processed = counters["processed"]
        rescaled = processed // saved_accumulation * accumulation
        for key in ("ready", "started", "processed", "completed"):
            counters[key] = rescaled - (processed - counters[key])


def checkpoint_progress_of(checkpoint: dict) -> tuple[int, int, int]:
    """(global step, epochs completed, batches completed) from a loaded checkpoint.

    The loop progress is stored under Lightning's own loop-state keys (``loops.fit_loop``),
    which have no reader outside the loops themselves.
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = fit_loop.get("epoch_progress", {}).get("current", {}).get("completed", 0)
    batches = fit_loop.get("epoch_loop.batch_progress", {}).get("total", {}).get("completed", 0)
    return int(checkpoint["global_step"]), int(epochs), int(batches)


# -- Lightning: the train loader's sampler -------------------------------------------


def replace_train_sampler(trainer: pl.Trainer, replace: Any) -> None:
    """Let ``replace(loader)`` prepare the train loader where Lightning would inject its
    ``DistributedSampler`` (``None`` from it: Lightning's own preparation).

    ``_DataConnector._prepare_dataloader`` (lightning 2.6.6) is the one place Lightning
    gives a train loader its sampler, after the checkpoint is restored and before the
    loader is iterated; a data module cannot do it there itself (its loader is built
    before Lightning knows the run's position), and no hook is offered.
    """
    from lightning.pytorch.trainer.states import RunningStage

    connector = trainer._data_connector
    prepare = connector._prepare_dataloader

    def prepare_with_ours(dataloader: object, shuffle: bool, mode: RunningStage) -> object:
        if mode == RunningStage.TRAINING and (replaced := replace(dataloader)) is not None:
            return replaced
        return prepare(dataloader, shuffle, mode)

    connector._prepare_dataloader = prepare_with_ours


def loader_with_sampler(loader: Any, sampler: Any) -> Any:
    """``loader`` rebuilt around ``sampler`` by Lightning's own ``_update_dataloader`` (the
    function that injects its ``DistributedSampler``: it keeps the loader's class and
    arguments), marked resumable: the sampler's position comes from the trainer, so there
    is no loader state to save, and Lightning would otherwise warn at a mid-epoch resume
    that the loader "is not resumable" (``_Stateful``)."""
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    if not (hasattr(rebuilt, "state_dict") and hasattr(rebuilt, "load_state_dict")):
        rebuilt.__class__ = _resumable(type(rebuilt))
    return rebuilt


_RESUMABLE: dict[type, type] = {}


def _resumable(cls: type) -> type:
    if cls not in _RESUMABLE:
        _RESUMABLE[cls] = type(
            cls.__name__,
            (cls,),
            {"state_dict": lambda self: {}, "load_state_dict": lambda self, state: None},
        )
    return _RESUMABLE[cls]


# -- Lightning: RNG states ------------------------------------------------------------


def collect_rng_states() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states: Lightning's own collector
    (``lightning.fabric.utilities.seed._collect_rng_states``), which knows every
    generator Lightning seeds; there is no public getter."""
    from lightning.fabric.utilities.seed import _collect_rng_states

    return _collect_rng_states(include_cuda=True)


def set_rng_states(states: dict[str, Any]) -> None:
    """The inverse of :func:`collect_rng_states` (``_set_rng_states``)."""
    from lightning.fabric.utilities.seed import _set_rng_states

    _set_rng_states(states)


# -- Lightning: the LR curve of a module outside a fit --------------------------------


def configured_schedulers(model: pl.LightningModule, trainer: pl.Trainer) -> tuple[list, list]:
    """(optimizers, scheduler configs) of ``model.configure_optimizers()`` as Lightning
    parses them (every return form it accepts, intervals and frequencies), with ``trainer``
    attached for the call. ``_configure_optimizers`` and ``_configure_schedulers_automatic_opt``
    (core/optimizer.py) are the parsers a fit uses; no public function exposes them."""
    from lightning.pytorch.core.optimizer import (
        _configure_optimizers,
        _configure_schedulers_automatic_opt,
    )

    model.trainer = trainer
    try:
        optimizers, schedulers, monitor = _configure_optimizers(model.configure_optimizers())
        return optimizers, _configure_schedulers_automatic_opt(schedulers, monitor)
    finally:
        model.trainer = None


# -- Lightning: ModelCheckpoint ---------------------------------------------------------


class ModelCheckpointSeam(ModelCheckpoint):
    """ModelCheckpoint with public names for the private parts ``RunCheckpoint`` needs.

    ModelCheckpoint offers no hook to refresh ``last.ckpt`` on its own or to decline a
    top-k save; its own methods for both are private (callbacks/model_checkpoint.py).
    """

    @property
    def every_n_train_steps(self) -> int:
        return self._every_n_train_steps

    @property
    def saves_within_epochs(self) -> bool:
        """True when a step or time trigger can save mid-epoch (otherwise its per-batch
        hook has nothing to do)."""
        return self._every_n_train_steps >= 1 or self._train_time_interval is not None

    def save_last_now(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` unless this step was saved already (then it is current)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def keeps_top_k(self, monitor_candidates: dict) -> bool:
        """Override: False skips the top-k save of this moment (``last.ckpt`` is unaffected)."""
        return True

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if self.keeps_top_k(monitor_candidates):
            super()._save_topk_checkpoint(trainer, monitor_candidates)


# -- LightningCLI / jsonargparse: a subcommand that is not a Trainer method -----------


class CLISeam(LightningCLI):
    """LightningCLI with public hooks for a subcommand of its own and for ``ckpt_path``.

    LightningCLI builds its subcommands from Trainer methods only (``_add_subcommands``,
    ``_run_subcommand``, and ``_setup_parser_kwargs`` for their parser options); ``plan`` must run without a Trainer (it plans for world sizes
    this machine does not have). Its ``_parse_ckpt_path`` torch-loads the checkpoint while
    parsing (a traceback for a damaged file) and merges saved hyperparameters over the
    options given now; the template validates the file itself and lets this launch win.
    """

    def extra_subcommands(self) -> dict[str, str]:
        """Name -> help of subcommands that are not Trainer methods."""
        return {}

    def add_extra_subcommand_arguments(self, name: str, parser: LightningArgumentParser) -> None:
        """Add the options only ``name`` has (the shared ones are already there)."""

    def run_extra_subcommand(self, name: str) -> None:
        raise NotImplementedError(name)

    def _setup_parser_kwargs(self, parser_kwargs: dict[str, Any]) -> tuple[dict, dict]:
        extra = {k: v for k, v in parser_kwargs.items() if k in self.extra_subcommands()}
        rest = {k: v for k, v in parser_kwargs.items() if k not in extra}
        main_kwargs, subcommand_kwargs = super()._setup_parser_kwargs(rest)
        return main_kwargs, {**subcommand_kwargs, **extra}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, help_text in self.extra_subcommands().items():
            sub_parser = self.init_parser(description=help_text, **kwargs.get(name, {}))
            self._add_arguments(sub_parser)
            self.add_extra_subcommand_arguments(name, sub_parser)
            self._subcommand_method_arguments[name] = []
            self._subcommand_parsers[name] = sub_parser
            parser._subcommands_action.add_subcommand(name, sub_parser, help=help_text)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in self.extra_subcommands():
            self.run_extra_subcommand(subcommand)
        else:
            super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        return None


# -- litdata ---------------------------------------------------------------------------


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


def map_every_chunk(dataset: Any) -> bool:
    """Let litdata memory-map every chunk of ``dataset`` for reads by index; False (and
    nothing changed) where it may delete chunks it has read.

    litdata 0.2.76 maps only the chunks it assigned to a worker's own stream
    (``Reader.enable_mmap_for_chunks``, called from ``StreamingDataset.__iter__``); a read by
    index (``dataset[i]``) of any other chunk opens the chunk file and, with per-item
    decoding, reads it whole for each item: about 1 ms an item from a remote dataset's
    local cache (840 against 41,000 items/s mapped, 3 KB items). Mapping is unsafe only
    where litdata deletes read chunks to stay under ``max_cache_size`` (a mapped file
    deleted under the map crashes the process), which its download thread decides once
    for the dataset (``_delete_chunks_when_processed``); the cache exists after a read.
    """
    reader = dataset.cache._reader if dataset.cache is not None else None
    if reader is None or reader._config is None:
        return False
    thread = reader._prepare_thread
    if thread is not None and thread._delete_chunks_when_processed:
        return False
    reader.enable_mmap_for_chunks(set(range(len(reader._config._chunks))))
    return True


def view_as_rank(dataset: Any, world_size: int, rank: int) -> Any:
    """Set the rank a ``StreamingDataset`` reads as, always as one node.

    litdata has no public way to say which rank a dataset is read as; its
    ``distributed_env`` attribute holds a ``litdata.utilities.env._DistributedEnv``.
    Why one node: ``streaming.StreamingDataModule.make_dataset``.
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
