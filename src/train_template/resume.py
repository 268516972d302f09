"""Resume: everything the template adds to a checkpoint, read once and applied once.

Beside Lightning's own state (weights, optimizers, schedulers, loop counters, loader
state) a checkpoint holds one entry of the template's, ``checkpoint["callbacks"][STATE_KEY]``
(:func:`state_to_save`, written by ``steps.RunMachinery`` at every save):

- ``plan``: the run's training plan (``plan.TrainingPlan.to_dict``), with the data
  settings that fix the sample order;
- ``rng``: every rank's torch, CUDA, numpy and Python RNG states (dropout draws), in rank
  order; only rank 0 writes the checkpoint, and ranks drift apart.

A resumed fit reads that entry once (:meth:`Resume.read`, at ``setup``) and applies it at
the Lightning hooks that allow each part. The order is Lightning's (2.6.6,
``Trainer._run``), enforced in ``steps.RunMachinery``:

1. ``setup``: the checkpoint is read; in the global sample order the checkpoint's global
   batch wins on any layout (:meth:`Resume.plan_inputs`: the accumulation is re-derived
   for this world size), and the plan is made once, before ``configure_optimizers``
   (which ``ModelParallelStrategy`` calls before it restores the checkpoint);
2. ``on_load_checkpoint`` (before Lightning restores its loops): :meth:`Resume.apply`
   refuses a changed plan in one line (:func:`plan_changes`) and rescales Lightning's
   micro-batch counters to the new accumulation (:func:`rescale_batch_counters`);
3. the train loader is prepared (after the loops are restored): the global order's
   sampler starts at :func:`order_position` of the restored global step;
4. the first train batch: this rank's RNG states are put back (:meth:`Resume.restore_rng`;
   not earlier, since Lightning's loops draw from the global generator before it).

The ``plan`` command uses the same read and the same checks (``plan_command.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from train_template.errors import UserError
from train_template.options import PlanOptions
from train_template.plan import TrainingPlan

# The template's entry in a checkpoint's "callbacks" (the name of the callback that
# wrote it in every version so far, so older checkpoints resume too).
STATE_KEY = "RunMachinery"

# What a resume must keep equal, checked in one place (plan_changes): the world size, the
# data settings that fix the sample order (data_order, shown as --data.* options), then
# every number of the remaining schedule. The dataset size enters through
# batches_per_epoch and samples_per_epoch.
RESUME_KEYS = (
    "world_size",
    "data_order",
    "batch_size",
    "accumulate_grad_batches",
    "batches_per_epoch",
    "samples_per_epoch",
    "max_steps",
    "warmup_steps",
)
# In the global sample order (--data.global_order) the layout may change: the run's
# global batch, its epochs and its schedule must not.
GLOBAL_ORDER_RESUME_KEYS = (
    "data_order",
    "global_batch_size",
    "steps_per_epoch",
    "samples_per_epoch",
    "max_steps",
    "warmup_steps",
)


def in_global_order(plan: dict | TrainingPlan) -> bool:
    """A plan in the global sample order: resumable on any layout."""
    order = plan.get("data_order", {}) if isinstance(plan, dict) else plan.data_order
    return bool(order.get("global_order"))


def state_to_save(plan: TrainingPlan) -> dict[str, Any]:
    """The template's checkpoint entry. A collective with several processes: Lightning
    builds the checkpoint on every rank (rank 0 writes it), so every rank calls this."""
    return {"plan": plan.to_dict(), "rng": gathered_rng_states()}


@dataclass(frozen=True)
class Resume:
    """What a checkpoint brings to a fit: its plan, its RNG states, its global step."""

    path: str
    plan: dict | None
    rng: list[dict[str, Any]] | None
    global_step: int

    @classmethod
    def read(cls, path: str | None) -> Resume | None:
        """The one read of a checkpoint's template state (None: no such checkpoint file,
        e.g. Lightning's own ``hpc``/``registry`` keywords)."""
        from train_template import checkpoint_files, storage

        if not path or not storage.exists(str(path)):
            return None
        return cls.of(str(path), checkpoint_files.read_checkpoint(str(path)))

    @classmethod
    def of(cls, path: str, checkpoint: dict) -> Resume:
        state = checkpoint.get("callbacks", {}).get(STATE_KEY, {})
        plan = state.get("plan")
        if plan is not None and "elastic" in plan.get("data_order", {}):
            # Checkpoints written before --data.elastic was renamed --data.global_order.
            order = dict(plan["data_order"])
            order["global_order"] = order.pop("elastic")
            plan = {**plan, "data_order": order}
        if (
            plan is not None
            and in_global_order(plan)
            and "shuffle_window" not in plan["data_order"]
        ):
            # Written before the blockwise shuffle: one permutation of all samples, which
            # --plan.shuffle_window null continues (any other window is refused).
            plan = {**plan, "data_order": {**plan["data_order"], "shuffle_window": None}}
        return cls(path, plan, state.get("rng"), int(checkpoint.get("global_step", 0)))

    def plan_inputs(self, options: PlanOptions, accumulate: int | None) -> tuple:
        """(plan options, accumulation) a resume plans with: in the global order the
        checkpoint's global batch wins (the accumulation is re-derived for this layout);
        a different global batch stated now is refused by :meth:`apply`."""
        saved = self.plan
        if saved is None or not in_global_order(saved) or options.global_batch_size is not None:
            return options, accumulate
        return replace(options, global_batch_size=saved["global_batch_size"]), 1

    def check(self, plan: TrainingPlan) -> None:
        """Refuse a checkpoint whose run had another plan, in one line (the same decision
        on every rank: the checkpoint and the plan are the same everywhere)."""
        if self.plan is not None and (changes := plan_changes(self.plan, plan)):
            raise UserError(
                f"the checkpoint was trained with another plan ({'; '.join(changes)}): resume "
                "with the original devices, num_nodes, batch size, accumulation, data settings "
                "and length, or start a new run in a new --trainer.default_root_dir"
            )

    def apply(self, checkpoint: dict, plan: TrainingPlan) -> None:
        """At ``on_load_checkpoint``: :meth:`check`, then Lightning's micro-batch counters
        counted in the new accumulation (before it restores its loops)."""
        from train_template.seam.checkpoint import batch_progress

        self.check(plan)
        if self.plan is None:
            return  # a checkpoint of a run without the template: Lightning's state only
        saved_accumulation = self.plan["accumulate_grad_batches"]
        if saved_accumulation != plan.accumulate_grad_batches:
            rescale_batch_counters(
                batch_progress(checkpoint), saved_accumulation, plan.accumulate_grad_batches
            )

    def restore_rng(self, rank: int) -> None:
        """At the first train batch: this rank's saved RNG states (the last saved rank's
        on a larger world)."""
        if self.rng:
            restore_rng_states(self.rng, rank)


def plan_changes(saved: dict, current: TrainingPlan) -> list[str]:
    """What differs between a checkpoint's plan and this launch's, in ``RESUME_KEYS``
    order; data settings and the batch size are named as their ``--data.*`` options."""
    now = current.to_dict()
    keys = (
        GLOBAL_ORDER_RESUME_KEYS if in_global_order(saved) and in_global_order(now) else RESUME_KEYS
    )
    changes = []
    for key in keys:
        if key not in saved or saved[key] == now[key]:
            continue
        if key == "data_order":
            changes += [
                f"--{ORDER_OPTION_GROUP.get(name, 'data')}.{name} "
                f"{option_value(saved[key].get(name))} -> {option_value(value)}"
                for name, value in now[key].items()
                if name in saved[key] and saved[key][name] != value
            ]
        elif key == "batch_size":
            changes.append(f"--data.batch_size {saved[key]} -> {now[key]}")
        else:
            changes.append(f"{key} {saved[key]} -> {now[key]}")
    return changes


# The order settings that are run options, not the data module's.
ORDER_OPTION_GROUP = {"shuffle_window": "plan", "shuffle_block": "plan"}


def option_value(value: object) -> str:
    """A setting as it is written on the command line (``null``, ``true``)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return str(value)


def rescale_batch_counters(progress: dict, saved_accumulation: int, accumulation: int) -> None:
    """Lightning's batch counters count micro-batches: a checkpoint resumed with another
    accumulation (same global batch, another layout) must count in the new unit, or the
    optimizer would step off its windows and the epoch would end at the wrong batch.

    A checkpoint of the global order is taken at a window boundary, so ``processed`` is a
    whole multiple of the saved accumulation. The other counters keep their distance from
    it: a save in ``on_train_batch_end`` has ``completed == processed - 1``, which is how
    Lightning 2.6.6 (``_TrainingEpochLoop.update_restart_stage``) knows that batch
    finished; scaling that lag too made a save on an epoch's last batch train one window
    of the finished epoch again.
    """
    for part in ("total", "current"):
        counters = progress[part]
        processed = counters["processed"]
        rescaled = processed // saved_accumulation * accumulation
        for key in ("ready", "started", "processed", "completed"):
            counters[key] = rescaled - (processed - counters[key])


def order_position(global_step: int, epochs_started: int, steps_per_epoch: int) -> tuple:
    """(epoch, first optimizer step in it) where the global order continues after a
    restore: counted from the restored global step; an end-of-epoch checkpoint whose epoch
    counter has not moved on yet starts the next epoch."""
    start = global_step - epochs_started * steps_per_epoch
    if start >= steps_per_epoch:
        return epochs_started + start // steps_per_epoch, start % steps_per_epoch
    return epochs_started, max(0, start)


# -- every rank's RNG states --------------------------------------------------------
# Lightning checkpoints do not hold the global RNG states; without them a resumed run
# draws different dropout masks and ends with different weights.


def gathered_rng_states() -> list[dict[str, Any]]:
    """Every rank's torch, CUDA, numpy and Python RNG states, in rank order."""
    from train_template.seam.checkpoint import collect_rng_states

    states = collect_rng_states()
    # numpy's state holds an ndarray; as tensors and ints, checkpoints still load with
    # weights_only=True.
    states["numpy"] = _numpy_state_to_safe(states["numpy"])
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def restore_rng_states(ranks: list[dict[str, Any]], rank: int) -> None:
    from train_template.seam.checkpoint import set_rng_states

    states = ranks[min(rank, len(ranks) - 1)]
    set_rng_states({**states, "numpy": _numpy_state_from_safe(states["numpy"])})


def _numpy_state_to_safe(state: tuple) -> dict[str, Any]:
    name, keys, position, has_gauss, cached_gaussian = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_safe(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["position"], state["has_gauss"], state["cached_gaussian"])
