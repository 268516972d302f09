"""The training plan of a run, from the real data: one path for ``fit`` and ``plan``.

:func:`plan_for` is the only way a plan is made. ``fit`` calls it at ``setup`` (through
``planned_trainer.plan_for_trainer``) with the Trainer's numbers; the ``plan`` command
calls it with the config's numbers for any world size. Both read the data's layout
(:func:`layout_of`, a ``layout.TrainLayout``):

- a data module with ``train_layout(world_size)`` (``StreamingDataModule``, litdata's own
  length rule, no loader built) is asked;
- any other source is measured by :func:`measured_layout` on a throwaway loader from
  ``train_dataloader()``: a plain map-style loader as the global order lays it out, any
  other as Lightning's ``DistributedSampler`` splits it.
"""

from __future__ import annotations

import math
from typing import Any

from train_template.errors import UserError
from train_template.layout import TrainLayout, accumulation_for, train_layout
from train_template.options import LRSchedule, PlanOptions
from train_template.order_loader import loader_layout
from train_template.plan import TrainingPlan, make_plan
from train_template.seam.loop import limited_batches


def plan_for(
    source: Any,
    *,
    world_size: int,
    num_nodes: int,
    accumulate_grad_batches: int,
    limit_train_batches: int | float | None,
    max_epochs: int | None,
    max_steps: int,
    options: PlanOptions,
    schedule: LRSchedule,
    distributed_sampler: bool = True,
) -> TrainingPlan:
    """The plan for ``source`` (the data module, or the module that has the loaders)."""
    options.check_order()
    layout = layout_of(source, world_size, accumulate_grad_batches, distributed_sampler)
    if options.global_batch_size is not None:
        derived = accumulation_for(
            options.global_batch_size, world_size, layout.batch_size, accumulate_grad_batches
        )
        if derived != accumulate_grad_batches:
            # A global-order layout depends on the accumulation (whole global batches).
            layout = layout_of(source, world_size, derived, distributed_sampler)
        accumulate_grad_batches = derived
    length = layout.batches_per_rank
    # A stream without a length has no epochs, unless an int limit_train_batches makes them.
    batches = limited_batches(math.inf if length is None else length, limit_train_batches)
    sized = length is not None
    return make_plan(
        batches_per_epoch=None if math.isinf(batches) else int(batches),
        batch_size=layout.batch_size,
        accumulate_grad_batches=accumulate_grad_batches,
        devices=world_size // num_nodes,
        num_nodes=num_nodes,
        rank_samples=layout.rank_samples if sized else None,
        data_order=order_with_options(dict(layout.order), options),
        tokens_per_sample=layout.tokens_per_sample,
        max_epochs=max_epochs,
        max_steps=max_steps,
        max_samples=options.max_samples,
        max_tokens=options.max_tokens,
        warmup=schedule.warmup,
    )


def order_with_options(data_order: dict, options: PlanOptions) -> dict:
    """A global order's settings with the run's ``--plan.shuffle_*`` (the layout counts
    the same batches with any window; the sampler reads them from the plan)."""
    if data_order.get("global_order"):
        data_order["shuffle_window"] = options.shuffle_window
        if data_order.get("shuffle_block") != "chunks":
            data_order["shuffle_block"] = options.shuffle_block
    return data_order


def layout_of(
    source: Any, world_size: int, accumulate_grad_batches: int = 1, distributed_sampler: bool = True
) -> TrainLayout:
    """The data's own ``train_layout(world_size, accumulate_grad_batches)``, or the measured one."""
    if callable(getattr(source, "train_layout", None)):
        return source.train_layout(world_size, accumulate_grad_batches=accumulate_grad_batches)
    return measured_layout(source, world_size, accumulate_grad_batches, distributed_sampler)


def measured_layout(
    source: Any, world_size: int, accumulate_grad_batches: int = 1, distributed_sampler: bool = True
) -> TrainLayout:
    """Layout of a train loader from ``train_dataloader()``: a plain map-style loader
    trains in the global order (``order_loader.py``); one with a sampler of its own at one
    process has its own length, on several each rank's share as Lightning's
    ``DistributedSampler`` makes it (every rank padded to ``ceil(len(sampler) /
    world_size)`` samples)."""
    loader = source.train_dataloader()
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is None:
        raise UserError("the train loader has no batch_size: the plan needs a batched loader")
    tokens = getattr(source, "tokens_per_sample", None)
    if distributed_sampler:
        layout = loader_layout(loader, world_size, accumulate_grad_batches, tokens)
        if layout is not None:
            return layout
    try:
        length = len(loader)
        sampled = len(loader.sampler) if loader.sampler is not None else None
    except TypeError:  # a stream without a length: each rank reads its own share
        return train_layout(batch_size, (None,) * world_size, tokens_per_sample=tokens)
    if world_size == 1 or not distributed_sampler or sampled is None:
        samples = sampled if sampled is not None else length * batch_size
        return train_layout(
            batch_size,
            (samples,) * world_size,
            rank_batches=(length,) * world_size,
            tokens_per_sample=tokens,
        )
    samples = math.ceil(sampled / world_size)
    return train_layout(
        batch_size, (samples,) * world_size, drop_last=loader.drop_last, tokens_per_sample=tokens
    )
