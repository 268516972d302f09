"""The plan equals what Lightning executes, on the real StreamingDataLoader over tiny shards.

Hypothesis draws sample counts, batch sizes, drop_last, accumulation,
limit_train_batches (int and float) and epochs; each example is a real
``Trainer.fit``: global_step must equal plan.max_steps, the scheduler must step
exactly max_steps times, the first step uses the warmup-start LR and the last the
final LR. A second test shows the short last accumulation window gets the gradient
of the batches it really holds.
"""

from __future__ import annotations

import csv
import tempfile
import threading
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import write_shards
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.exceptions import MisconfigurationException
from plain_lightning import DocsStyleModule
from shard_data import ShardData
from template_user import PlannedLRModule

from train_template.errors import UserError
from train_template.options import LRSchedule, PlanOptions
from train_template.planned_trainer import PlannedTrainer
from train_template.steps import template_callbacks

BASE_LR = 0.1


class StepRecorder(pl.Callback):
    def __init__(self):
        self.lrs, self.grads, self.batch_ids = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_ids.append(batch["index"].tolist())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def quiet_trainer(root, trainer_class=PlannedTrainer, **overrides) -> pl.Trainer:
    """A CPU Trainer (the template's, or ``pl.Trainer``) without validation, checkpoints,
    progress bar or summary (what every fit here shares); ``overrides`` say what a test
    measures."""
    settings = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer_class(**{**settings, **overrides})


def fit(
    data_dir,
    *,
    batch_size,
    drop_last,
    accumulate,
    limit,
    epochs,
    warmup_fraction=0.25,
    scale=True,
    global_order=True,
    docs_module=False,
):
    """A real fit; ``docs_module``: the docs-style module (its own OneCycleLR from
    ``estimated_stepping_batches``, no dropout) instead of one on the template's LR curve."""
    torch.manual_seed(0)
    model = DocsStyleModule(lr=BASE_LR, dropout=0.0) if docs_module else PlannedLRModule(BASE_LR)
    schedule = LRSchedule(
        warmup_fraction=warmup_fraction,
        decay="cosine",
        final_lr_factor=0.1,
        warmup_start_factor=0.01,
    )
    data = ShardData(
        str(data_dir),
        batch_size=batch_size,
        drop_last=drop_last,
        shuffle=True,
        global_order=global_order,
    )
    recorder = StepRecorder()
    trainer = quiet_trainer(
        tempfile.mkdtemp(),  # plan.json goes there, never into the checkout
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        limit_train_batches=limit,
        callbacks=[
            *template_callbacks(PlanOptions(scale_partial_accumulation=scale), schedule),
            recorder,
        ],
    )
    trainer.fit(model, data)
    return trainer, trainer.training_plan, recorder, model


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_samples=st.integers(1, 500),
    batch_size=st.integers(4, 32),
    drop_last=st.booleans(),
    accumulate=st.integers(1, 8),
    limit=st.one_of(st.none(), st.integers(1, 40), st.floats(0.05, 1.0)),
    epochs=st.integers(1, 3),
    global_order=st.booleans(),
    docs_module=st.booleans(),
)
def test_planned_steps_equal_executed_steps(
    num_samples, batch_size, drop_last, accumulate, limit, epochs, global_order, docs_module
):
    """Both orders: the global order (whole global batches of batch x accumulation) and
    litdata's own stream (``global_order=False``: Lightning's rule, short last windows).
    Both modules: the template's LR curve, and a docs-style module's own OneCycleLR sized
    from ``estimated_stepping_batches`` (which raises if stepped past its total)."""
    limit = 1.0 if limit is None else limit
    per_batch = batch_size * accumulate if global_order else batch_size
    full_batches = num_samples // per_batch if drop_last else -(-num_samples // per_batch)
    if global_order:
        full_batches *= accumulate  # micro-batches of whole global batches
    settings = dict(
        batch_size=batch_size,
        drop_last=drop_last,
        accumulate=accumulate,
        limit=limit,
        epochs=epochs,
        global_order=global_order,
        docs_module=docs_module,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_shards(Path(tmp), num_samples)
        if full_batches == 0:
            with pytest.raises(UserError, match="fewer than one (global )?batch"):
                fit(data_dir, **settings)
            return
        if isinstance(limit, float) and int(limit * full_batches) == 0:
            # Lightning refuses a fraction that keeps no batch, with a clear message.
            with pytest.raises(MisconfigurationException, match="limit_train_batches"):
                fit(data_dir, **settings)
            return
        trainer, plan, recorder, model = fit(data_dir, **settings)
    assert trainer.global_step == plan.max_steps
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == plan.max_steps
    assert len(recorder.lrs) == plan.max_steps
    if docs_module:  # OneCycleLR's total is the plan's, and it ends on its final LR
        assert trainer.estimated_stepping_batches == plan.max_steps
        assert recorder.lrs[-1] == pytest.approx(BASE_LR / 25 / 1e4)
    else:
        if plan.warmup_steps > 0:
            assert recorder.lrs[0] == pytest.approx(BASE_LR * 0.01)
        if plan.max_steps > 1 or plan.warmup_steps == 0:
            assert recorder.lrs[-1] == pytest.approx(BASE_LR * 0.1)
    # every batch of every epoch was seen, and no sample twice within an epoch but the
    # padding of a last partial window (drop_last false: the epoch's first samples again)
    per_epoch = plan.batches_per_epoch
    assert len(recorder.batch_ids) == per_epoch * plan.epochs
    for epoch in range(plan.epochs):
        ids = [i for ids in recorder.batch_ids[epoch * per_epoch :][:per_epoch] for i in ids]
        assert len(set(ids)) == min(len(ids), num_samples), f"a sample twice in epoch {epoch}"


def test_the_readmes_example_runs_three_steps_per_epoch(tmp_path):
    """N=100, batch 8, accumulation 4, drop_last: the naive ceil(100 / 32) says 4 steps per
    epoch; Lightning performs 3 (plain Trainer, plain DataLoader), and so does the plan."""
    from plain_lightning import DigitsDicts
    from torch.utils.data import DataLoader

    loader = DataLoader(DigitsDicts(0, 100), batch_size=8, drop_last=True)
    plain = quiet_trainer(tmp_path, pl.Trainer, max_epochs=1, accumulate_grad_batches=4)
    plain.fit(DocsStyleModule(), loader)
    trainer, plan, _, _ = fit(
        write_shards(tmp_path / "shards", 100),
        batch_size=8,
        drop_last=True,
        accumulate=4,
        limit=1.0,
        epochs=1,
        docs_module=True,
    )
    assert plain.global_step == plan.steps_per_epoch == trainer.global_step == 3


@pytest.mark.parametrize("scale", [True, False])
def test_short_last_window_gets_the_gradient_of_its_own_batches(tmp_path, scale):
    # 40 samples, batch 8 -> 5 batches; accumulate 4 -> windows of 4 and 1 batches.
    data_dir = write_shards(tmp_path, 40)
    trainer, plan, recorder, model = fit(
        data_dir,
        batch_size=8,
        drop_last=True,
        accumulate=4,
        limit=1.0,
        epochs=1,
        warmup_fraction=0.0,
        scale=scale,
        global_order=False,  # the global order has whole windows only
        docs_module=True,  # a module that never heard of the template
    )
    assert plan.steps_per_epoch == 2
    # Recompute the last window's gradient by hand: the mean loss over its one batch,
    # with the weights the model had before that step.
    data = ShardData(str(data_dir), batch_size=8, shuffle=False)
    data.setup("fit")
    by_id = {int(s["index"]): s for s in data.datasets["train"]}
    batch = data.collate([by_id[i] for i in recorder.batch_ids[4]])
    torch.manual_seed(0)
    network = DocsStyleModule(dropout=0.0).net  # the fitted model's initial weights
    # Replay step 1 (SGD; momentum's first step is the gradient): initial - lr_1 * grad_1.
    with torch.no_grad():
        for param, grad in zip(network.parameters(), recorder.grads[0].values(), strict=True):
            param -= recorder.lrs[0] * grad
    loss = torch.nn.functional.cross_entropy(network(batch["image"]), batch["label"])
    loss.backward()
    expected = {f"net.{n}": p.grad for n, p in network.named_parameters()}
    factor = 1.0 if scale else 1.0 / 4  # unscaled, Lightning divides by the full window
    for name, grad in recorder.grads[1].items():
        torch.testing.assert_close(grad, expected[name] * factor, rtol=1e-5, atol=1e-6)


def test_global_batch_size_derives_the_accumulation_lightning_runs(tmp_path):
    # 64 samples per step at batch 8 on one process: accumulate 8; 40 batches -> 5 steps
    data_dir = write_shards(tmp_path, 320)
    data = ShardData(str(data_dir), batch_size=8, drop_last=True)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        callbacks=template_callbacks(PlanOptions(global_batch_size=64)),
    )
    trainer.fit(PlannedLRModule(), data)
    plan = trainer.training_plan
    assert (plan.accumulate_grad_batches, plan.global_batch_size) == (8, 64)
    assert trainer.accumulate_grad_batches == 8
    assert trainer.global_step == plan.max_steps == 2 * 5


class ScheduledLRModule(DocsStyleModule):
    """The docs-style module on SGD with an LR of BASE_LR / (step + 1); ``tensor_lr``: the
    LR is one tensor, as capturable optimizers take it, which the scheduler updates in
    place every step; ``manual``: manual optimization as Lightning's docs show it (the
    step steps the optimizer and the scheduler itself and returns nothing)."""

    def __init__(self, tensor_lr: bool = False, manual: bool = False) -> None:
        super().__init__(dropout=0.0)
        self.tensor_lr = tensor_lr
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])
        self.manual_backward(loss)
        optimizer.step()
        self.lr_schedulers().step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        lr = torch.tensor(BASE_LR) if self.tensor_lr else BASE_LR
        optimizer = torch.optim.SGD(self.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def assert_every_step_has_its_lr_row(tmp_path, module, **overrides) -> None:
    """Fit ``module`` for 26 steps with the template's callbacks and a CSV logger written
    every 5 steps: ``metrics.csv`` holds each step's own LR, and only those rows."""
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        log_every_n_steps=5,
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=template_callbacks(),
        **overrides,
    )
    data = ShardData(str(write_shards(tmp_path / "shards", 100)), batch_size=8)
    trainer.fit(module, data)
    rows = csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv"))
    lrs = {int(row["step"]): float(row["lr-SGD"]) for row in rows if row.get("lr-SGD")}
    assert sorted(lrs) == list(range(trainer.global_step)) and trainer.global_step == 26
    assert [lrs[step] for step in sorted(lrs)] == pytest.approx(
        [BASE_LR / (step + 1) for step in range(26)]
    )


def test_metrics_csv_holds_the_lr_of_every_step_also_a_tensor_lr(tmp_path):
    """The template keeps each step's LR and hands the rows to the loggers on logging steps
    (steps.StepLRLog): every step's own value arrives, also when the LR is one tensor the
    scheduler overwrites in place."""
    assert_every_step_has_its_lr_row(tmp_path, ScheduledLRModule(tensor_lr=True))


def test_a_manual_optimization_module_gets_its_plan_and_every_steps_lr(tmp_path):
    """Manual optimization as Lightning's docs write it returns nothing from
    ``training_step``: the fit runs the plan's steps (26, asserted in the helper) with an
    LR row for each; the template's finiteness guard once failed on the missing loss."""
    assert_every_step_has_its_lr_row(tmp_path, ScheduledLRModule(manual=True))


def test_steps_a_grad_scaler_skips_still_get_their_lr_row(tmp_path):
    """The LR is read from inside ``optimizer.step`` (StepLRLog.attach); a GradScaler skips
    that call on an overflow while Lightning counts the step and its scheduler moves on.
    With a scaler the callback's own hook records instead: fp16 autocast on CPU, a scale
    large enough that some steps overflow (without the fallback steps 0-4, 6, 7, ... had
    no row), and every step still has its row and value."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler)]
    assert_every_step_has_its_lr_row(tmp_path, ScheduledLRModule(), plugins=plugins)
    assert scaler.get_scale() < 2.0**24  # the scaler backed off: steps were skipped


def test_a_fit_started_from_another_thread_runs_and_says_signals_are_not_caught(tmp_path):
    """Only the main thread may set signal handlers; a fit started from another thread (a
    notebook's, a service's worker) runs its plan and says once that a preemption signal
    will not save (Lightning skips its own handlers there too)."""
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=template_callbacks())
    data = ShardData(str(write_shards(tmp_path / "shards", 100)), batch_size=8)
    caught: list = []

    def fit() -> None:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            trainer.fit(DocsStyleModule(), data)
        caught.extend(str(w.message) for w in said)

    thread = threading.Thread(target=fit)
    thread.start()
    thread.join()
    assert trainer.global_step == trainer.training_plan.max_steps == 26
    assert [m for m in caught if "SIGUSR1/SIGTERM are not caught" in m] == [
        "the fit runs outside the main thread: SIGUSR1/SIGTERM are not caught, so a "
        "preemption does not save last.ckpt (start the fit in the main thread)"
    ]
