"""Lightning's fit loop: its length, its position, its logging steps, its train sampler.

Pinned: lightning 2.6.6. Each function says which private name it reads and why no
public API serves.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


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


def limited_batches(length: int | float, limit: int | float | None) -> int | float:
    """Batches per epoch after ``limit_train_batches``, by Lightning's own rule.

    ``_parse_num_batches`` (trainer/connectors/data_connector.py) is the function the fit
    loop applies; its rounding and its errors for fractions that leave no batch are what
    a plan must match, and it has no public equivalent.
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


def step_counter(trainer: pl.Trainer) -> Any:
    """The progress tracker whose ``completed`` is ``trainer.global_step``, for code that
    reads the step on every batch: ``_TrainingEpochLoop.global_step`` finds it through four
    properties each time (automatic or manual optimization). Lightning updates the
    tracker in place (restore, resets), so one looked up at train start serves the fit."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        return loop.automatic_optimization.optim_progress.optimizer.step.total
    return loop.manual_optimization.optim_step_progress.total


def is_logging_step(trainer: pl.Trainer) -> bool:
    """True on the training batches whose ``self.log`` values Lightning writes (every
    ``log_every_n_steps``, and the last one); it drops the values of the others.

    A public function for any module: logging only here saves about 0.3 ms per
    ``self.log`` call on the other steps. Lightning's own LearningRateMonitor makes this
    same check through ``trainer._logger_connector.should_update_logs`` (no public name).
    """
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


# The callback hooks Lightning calls on every training or validation batch.
BATCH_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
)


def skip_idle_batch_hooks(callback: Callback, idle: tuple[str, ...] = ()) -> None:
    """Lightning calls every batch hook of every callback, Callback's empty ones too, each
    through a profiler context labelled with the callback's ``state_key``
    (``trainer/call.py::_call_callback_hooks``): about 2 us a hook, six hooks per callback
    per training batch. It skips a hook attribute that is not callable, so each batch hook
    this callback's class leaves empty, and each named in ``idle``, is set to None on the
    instance (Lightning's ``is_overridden`` then says False for it too). No public switch
    exists."""
    for name in BATCH_HOOKS:
        if name in idle or getattr(type(callback), name) is getattr(Callback, name):
            set_hook_idle(callback, name, True)


def set_hook_idle(callback: Callback, name: str, idle: bool) -> None:
    """Skip (``idle``) or call again one hook of this callback (see above)."""
    if idle:
        setattr(callback, name, None)
    else:
        vars(callback).pop(name, None)  # the class's method again


def replace_train_sampler(trainer: pl.Trainer, replace: Any) -> None:
    """Let ``replace(loader)`` prepare the train loader where Lightning would inject its
    ``DistributedSampler`` (``None`` from it: Lightning's own preparation).

    ``_DataConnector._prepare_dataloader`` is the one place Lightning gives a train loader
    its sampler, after the checkpoint is restored and before the loader is iterated; a
    data module cannot do it there itself (its loader is built before Lightning knows the
    run's position), and no hook is offered.
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


def stop_lookahead_of_a_stateful_stream(trainer: pl.Trainer) -> bool:
    """Read no further ahead than the batch being trained, for a train loader without a
    length that saves its position (``state_dict``/``load_state_dict``: torchdata's
    ``StatefulDataLoader``). True when it applied.

    Lightning's ``_PrefetchDataFetcher`` (loops/fetchers.py) reads one batch ahead of a
    loader without a length, to know the last batch in advance; the position Lightning
    saves in a checkpoint (``FitLoop.on_save_checkpoint``: the loader's ``state_dict``) is
    then one batch past the last one trained, and a resume skipped that batch (measured:
    the resumed step 10 trained the uninterrupted run's step 11). The fetcher made in
    ``FitLoop.setup_data`` (``fit_loop._data_fetcher``; no public setting of the train
    loop's lookahead) becomes one that hands out the batch it already read, then reads
    one per step. Such a stream's last batch is then known when it runs dry, which the
    plan's length (a stream trains to ``max_steps``) does not need.
    """
    from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher

    fetcher = trainer.fit_loop._data_fetcher
    if type(fetcher) is not _PrefetchDataFetcher or fetcher.length is not None:
        return False  # a sized loader is not read ahead; a dataloader_iter step is its own
    loaders = trainer.fit_loop._combined_loader.flattened
    if not any(
        callable(getattr(loader, "state_dict", None))
        and callable(getattr(loader, "load_state_dict", None))
        for loader in loaders
    ):
        return False  # nothing saves a position: reading ahead changes nothing
    fetcher.__class__ = _no_lookahead_fetcher()
    fetcher.prefetch_batches = 0
    return True


def _no_lookahead_fetcher() -> type:
    from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher

    class NoLookaheadFetcher(_PrefetchDataFetcher):
        def __next__(self) -> Any:
            if self.batches:  # the batch read ahead at setup, handed out without a refill
                return self.batches.pop(0)
            return super().__next__()

    return NoLookaheadFetcher
