"""Optuna's trial ids and storage, for ``sweep.py``. Pinned: optuna 5.1.

A sweep's worker continues a trial it did not create in this process (one left running
by a kill or a requeue): it needs the trial's storage id, which ``FrozenTrial`` and
``Trial`` keep as ``_trial_id``, and the study's storage (``Study._storage``) to set
user attributes and read intermediate values of a trial by id. Optuna's public API does
this only through a ``Trial`` object of the process that asked for it.
"""

from __future__ import annotations

from typing import Any


def trial_id(trial: Any) -> int:
    return trial._trial_id


def storage_of(study: Any) -> Any:
    return study._storage
