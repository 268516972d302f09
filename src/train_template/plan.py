"""The training plan: how many optimizer steps a run takes, derived from the real loader.

Pure arithmetic on purpose: no Lightning, no litdata, so it can be tested exhaustively
in microseconds. ``plan_from_data.plan_for`` is the one caller: at ``fit`` setup and in the
``plan`` command it hands this module what every rank's train loader yields (a
``layout.TrainLayout``, measured on the real data) and the trainer's numbers.

How Lightning steps (2.x): each rank's train loader yields ``batches_per_epoch``
batches; the optimizer steps after every ``accumulate_grad_batches`` batches *and*
on the last batch of the epoch, even when that accumulation window is short. So
``steps_per_epoch = ceil(batches_per_epoch / accumulate_grad_batches)``, which the
usual ``ceil(samples / (batch * accumulate * world))`` gets wrong whenever a short
window or drop_last is involved.

Precedence of the training length (most specific wins, printed in the plan):
``max_steps`` (optimizer steps) > ``max_samples`` (global samples) or ``max_tokens``
(global tokens, token datasets) > ``max_epochs``. Setting more than one of
``max_steps``, ``max_samples`` and ``max_tokens`` is a conflict and an error.

A stream without a length (an ``IterableDataset`` with no ``__len__``: Hugging Face
streaming, webdataset, a bucket reader) has ``batches_per_epoch=None``: its length is given
in steps, samples or tokens, its epoch fields are ``None``, and it must last the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from train_template.errors import PlanError
from train_template.options import WarmupSetting

NO_WARMUP = WarmupSetting()


@dataclass(frozen=True)
class TrainingPlan:
    """Everything that depends on world size, accumulation and loader length, in one place."""

    world_size: int
    devices: int
    num_nodes: int
    batch_size: int
    accumulate_grad_batches: int
    global_batch_size: int
    # Per rank, after sharding, drop_last and limit_train_batches. The epoch fields are
    # None for a stream without a length.
    batches_per_epoch: int | None
    samples_per_epoch: int | None  # distinct samples, all ranks together (padding not counted)
    steps_per_epoch: int | None
    epochs: int | None
    max_steps: int
    warmup_steps: int
    length_from: (
        str  # which setting decided the length: max_steps, max_samples, max_tokens, max_epochs
    )
    # Token datasets only (None otherwise): tokens one sample trains on, per step, budget.
    tokens_per_sample: int | None = None
    global_tokens_per_step: int | None = None
    max_tokens: int | None = None
    # The data settings that fix the sample order (TrainLayout.order), kept for resume.
    data_order: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """All fields; the token fields only for token datasets."""
        fields = dataclasses.asdict(self)
        if self.tokens_per_sample is None:
            for key in ("tokens_per_sample", "global_tokens_per_step", "max_tokens"):
                fields.pop(key)
        return fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def make_plan(
    *,
    batches_per_epoch: int | None,
    batch_size: int,
    accumulate_grad_batches: int,
    devices: int = 1,
    num_nodes: int = 1,
    rank_samples: Sequence[int] | None = None,
    data_order: dict | None = None,
    max_epochs: int | None = None,
    max_steps: int = -1,
    max_samples: int | None = None,
    max_tokens: int | None = None,
    tokens_per_sample: int | None = None,
    warmup: WarmupSetting = NO_WARMUP,
) -> TrainingPlan:
    """Derive the plan; raises PlanError with a one-line fix for impossible inputs.
    ``rank_samples``: each rank's own samples per epoch, padding not counted (default:
    full batches everywhere); only reports and ``max_samples`` read them."""
    _check_layout(batch_size, accumulate_grad_batches, devices, num_nodes)
    world_size = devices * num_nodes
    global_batch_size = batch_size * accumulate_grad_batches * world_size
    samples_per_epoch, steps_per_epoch = _epoch_of(
        batches_per_epoch, batch_size, accumulate_grad_batches, world_size, rank_samples
    )
    length_from, total_steps = _length_of(
        max_epochs,
        max_steps,
        max_samples,
        max_tokens,
        tokens_per_sample,
        samples_per_epoch,
        steps_per_epoch,
        batch_size * world_size,
        accumulate_grad_batches,
    )
    warmup_steps = _warmup_steps(warmup, total_steps, steps_per_epoch)
    tokens = tokens_per_sample is not None
    return TrainingPlan(
        world_size=world_size,
        devices=devices,
        num_nodes=num_nodes,
        batch_size=batch_size,
        accumulate_grad_batches=accumulate_grad_batches,
        global_batch_size=global_batch_size,
        batches_per_epoch=batches_per_epoch,
        samples_per_epoch=samples_per_epoch,
        steps_per_epoch=steps_per_epoch,
        epochs=None if steps_per_epoch is None else math.ceil(total_steps / steps_per_epoch),
        max_steps=total_steps,
        warmup_steps=warmup_steps,
        length_from=length_from,
        tokens_per_sample=tokens_per_sample,
        global_tokens_per_step=global_batch_size * tokens_per_sample if tokens else None,
        max_tokens=max_tokens if tokens else None,
        data_order=dict(data_order or {}),
    )


def _warmup_steps(warmup: WarmupSetting, total_steps: int, steps_per_epoch: int | None) -> int:
    """The plan's warmup in steps; it must leave steps to decay over."""
    steps = warmup.to_steps(total_steps, steps_per_epoch)
    if steps >= total_steps and steps > 0:
        raise PlanError(
            f"warmup ({steps} steps) is not shorter than training ({total_steps} steps): "
            "lower the --lr_schedule.warmup_* setting or train longer"
        )
    return steps


def _check_layout(batch_size: int, accumulate: int, devices: int, num_nodes: int) -> None:
    if batch_size < 1:
        raise PlanError(f"--data.batch_size={batch_size}: the batch size must be at least 1")
    if accumulate < 1:
        raise PlanError(f"--trainer.accumulate_grad_batches={accumulate}: must be at least 1")
    if devices < 1 or num_nodes < 1:
        raise PlanError(
            f"--trainer.devices={devices} --trainer.num_nodes={num_nodes}: both must be >= 1"
        )


def _epoch_of(
    batches_per_epoch: int | None,
    batch_size: int,
    accumulate: int,
    world_size: int,
    rank_samples: Sequence[int] | None,
) -> tuple[int | None, int | None]:
    """(distinct samples per epoch over all ranks, optimizer steps per epoch); both None
    for a stream without a length."""
    if batches_per_epoch is None:
        return None, None
    if batches_per_epoch < 1:
        raise PlanError(
            f"the train loader yields {batches_per_epoch} batches per rank per epoch "
            f"(batch_size={batch_size}, world_size={world_size}): use a smaller "
            "--data.batch_size, fewer devices, more data, or --data.drop_last false"
        )
    rank_cap = batches_per_epoch * batch_size  # limit_train_batches may cut a rank short
    if rank_samples is None:
        rank_samples = [rank_cap] * world_size
    if len(rank_samples) != world_size:
        raise ValueError(f"{len(rank_samples)} per-rank sample counts for world size {world_size}")
    samples_per_epoch = sum(min(samples, rank_cap) for samples in rank_samples)
    return samples_per_epoch, math.ceil(batches_per_epoch / accumulate)


def _length_of(
    max_epochs: int | None,
    max_steps: int,
    max_samples: int | None,
    max_tokens: int | None,
    tokens_per_sample: int | None,
    samples_per_epoch: int | None,
    steps_per_epoch: int | None,
    samples_per_batch: int,
    accumulate: int,
) -> tuple[str, int]:
    """(which setting decided the length, the run's optimizer steps), by the precedence
    in the module docstring."""
    _check_lengths(max_steps, max_samples, max_tokens, tokens_per_sample)
    if max_steps is not None and max_steps > 0:
        return "max_steps", max_steps
    if max_samples is not None or max_tokens is not None:
        budget = max_samples if max_samples is not None else -(-max_tokens // tokens_per_sample)
        steps = _steps_for_samples(
            budget, samples_per_epoch, steps_per_epoch, samples_per_batch, accumulate
        )
        return ("max_samples" if max_samples is not None else "max_tokens"), steps
    if steps_per_epoch is None:
        raise PlanError(
            f"--trainer.max_epochs={max_epochs}: the train loader has no length (a stream), so "
            "it has no epochs: give the length as --trainer.max_steps, --plan.max_samples or "
            "--plan.max_tokens"
        )
    if max_epochs is None or max_epochs < 1:
        raise PlanError(
            f"--trainer.max_epochs={max_epochs} trains nothing: set a positive "
            "--trainer.max_epochs, --trainer.max_steps or --plan.max_samples"
        )
    return "max_epochs", max_epochs * steps_per_epoch


def _check_lengths(max_steps, max_samples, max_tokens, tokens_per_sample) -> None:
    """One training length at most, and none that trains nothing."""
    lengths = {
        "--trainer.max_steps": max_steps if max_steps is not None and max_steps > 0 else None,
        "--plan.max_samples": max_samples,
        "--plan.max_tokens": max_tokens,
    }
    given = [f"{name}={value}" for name, value in lengths.items() if value is not None]
    if len(given) > 1:
        raise PlanError(f"{' and '.join(given)} are set: keep only one training length")
    if max_steps is not None and max_steps not in (-1, None) and max_steps < 1:
        raise PlanError(
            f"--trainer.max_steps={max_steps} trains nothing: use a positive count, or -1 for unset"
        )
    if max_samples is not None and max_samples < 1:
        raise PlanError(f"--plan.max_samples={max_samples}: must be at least 1")
    if max_tokens is not None:
        if tokens_per_sample is None:
            raise PlanError(
                f"--plan.max_tokens={max_tokens}: the data module yields no token samples "
                "(no tokens_per_sample): use --plan.max_samples or --trainer.max_epochs"
            )
        if max_tokens < 1:
            raise PlanError(f"--plan.max_tokens={max_tokens}: must be at least 1")


def _steps_for_samples(
    max_samples: int,
    samples_per_epoch: int | None,
    steps_per_epoch: int | None,
    samples_per_global_batch: int,
    accumulate_grad_batches: int,
) -> int:
    """Optimizer steps until at least ``max_samples`` samples have been consumed.

    Whole epochs first, then the whole batches the remainder needs; the step count
    follows Lightning's rule for the partial epoch too. A stream (no epochs) is all
    remainder.
    """
    if samples_per_epoch is None:
        full_epochs, remainder = 0, max_samples
    else:
        full_epochs, remainder = divmod(max_samples, samples_per_epoch)
    remainder_batches = math.ceil(remainder / samples_per_global_batch)
    full_steps = full_epochs * steps_per_epoch if full_epochs else 0
    return full_steps + math.ceil(remainder_batches / accumulate_grad_batches)
