"""The template's public API: what your LightningModule, DataModule, config or script may use.

A module written the way Lightning's docs show needs none of it: the plan, exact resume,
the guards and the launch checks come from ``train.py`` (the CLI) and the callbacks it
adds. These names are for code that wants more:

- ``planned_optimization(optimizer, trainer)`` / ``planned_lr_scheduler``: return it from
  ``configure_optimizers`` to follow the run's ``--lr_schedule.*`` curve (warmup included),
  as long as the training plan;
- ``is_logging_step(trainer)``: log only on the steps Lightning writes (cheaper steps);
- ``StreamingDataModule``: litdata shards with the global sample order, padding and
  exact resume; subclass it and write ``collate`` (``shards`` writes the shards);
- ``ThroughputMonitor``, ``SampleIdRecorder``, ``PredictionWriter``: callbacks a config
  may add (``trainer.callbacks``);
- ``PlannedTrainer``, ``template_callbacks``: the Trainer and callbacks the CLI uses, for
  a script of your own;
- ``TrainingPlan``, ``make_plan``: the plan's arithmetic; ``UserError``: a one-line error.

Imports are lazy (PEP 562): ``import train_template`` costs nothing until a name is used,
so scripts that only write shards do not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "planned_optimization": "train_template.schedule",
    "planned_lr_scheduler": "train_template.schedule",
    "is_logging_step": "train_template.seam.loop",
    "StreamingDataModule": "train_template.streaming",
    "ThroughputMonitor": "train_template.callbacks",
    "SampleIdRecorder": "train_template.callbacks",
    "PredictionWriter": "train_template.callbacks",
    "PlannedTrainer": "train_template.planned_trainer",
    "template_callbacks": "train_template.steps",
    "TrainingPlan": "train_template.plan",
    "make_plan": "train_template.plan",
    "UserError": "train_template.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'train_template' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return __all__
