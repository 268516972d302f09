"""The trial side of a sweep (``train.py sweep``): what a trial's ``fit`` reports to the study.

The sweep starts each trial as an ordinary ``train.py fit`` with ``TRIAL_ENV`` in its
environment (the study's storage, the trial's id, the metric); then ``TrialReporter``
(added by ``steps.template_callbacks`` only there) reports the metric to the study after
every validation, on rank 0, and stops the run cleanly where Optuna's pruner says so: every
rank receives rank 0's decision and stops at the same step, the end-of-epoch checkpoint
and the logs are kept, and the trial records the epoch it was pruned at for the sweep.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from train_template.seam.loop import skip_idle_batch_hooks

TRIAL_ENV = "TRAIN_TEMPLATE_SWEEP_TRIAL"
PRUNED_AT = "pruned_at_epoch"  # the trial's user attribute the sweep reads


@dataclass
class TrialLink:
    """Where a trial reports: the study's storage, its name, the trial, the metric."""

    storage: str
    study: str
    trial_id: int
    metric: str
    pruner: str

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> TrialLink | None:
        text = os.environ.get(TRIAL_ENV)
        return cls(**json.loads(text)) if text else None


def open_storage(spec: str):
    """A journal file path (the default: works from many processes on a shared
    filesystem), or an RDB URL (``sqlite:///...``, ``postgresql://...``)."""
    import optuna

    if "://" in spec:
        return spec
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(spec))


def make_pruner(name: str):
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


class TrialReporter(Callback):
    """Reports ``link.metric`` after each validation; stops the run where the pruner says."""

    def __init__(self, link: TrialLink) -> None:
        self.link = link
        self._trial = None
        skip_idle_batch_hooks(self)  # it works after validations only

    def _optuna_trial(self):
        if self._trial is None:
            import optuna

            study = optuna.load_study(
                study_name=self.link.study,
                storage=open_storage(self.link.storage),
                pruner=make_pruner(self.link.pruner),
            )
            self._trial = optuna.trial.Trial(study, self.link.trial_id)
        return self._trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.link.metric)
            if value is not None:
                trial = self._optuna_trial()
                trial.report(float(value), step=trainer.current_epoch)
                prune = trial.should_prune()
                if prune:
                    trial.set_user_attr(PRUNED_AT, trainer.current_epoch)
        # Every rank stops at the same step: rank 0's decision, sent through the strategy.
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True
