"""Per-step training time: the template's fit machinery vs a hand-written PyTorch loop.

Same network, same StreamingDataLoader batches, same optimizer and LR schedule. "bare
Lightning" is a module with no logging, metrics or callbacks; "template machinery" is
the same module under the template's trainer with the callbacks the CLI adds to a fit
(``steps.template_callbacks``: RunMachinery, then RunCheckpoint) and a CSV logger: their
ratio is the template's own per-step cost, printed by median, by fastest run and paired
(the median of each round's ratio: the steadiest on a machine whose speed drifts).
"bare Lightning + epoch-end checkpoint" is Lightning's default checkpointing, which the
template also does by default (the saves are not timed; the steps after one are). "template
+ example module" adds the digits ClassifierModule (train accuracy, logging as the default
config does). Timed: the epochs after a warm-up epoch, a fit's figure the fastest of its
epochs; the tiny size on one thread, pinned to one core.

    .venv/bin/python scripts/bench/bench_step.py [--repeats 5]
    .venv/bin/python scripts/bench/bench_step.py --hooks   # the template's own hooks, us per step
    .venv/bin/python scripts/bench/bench_step.py --calls   # Python calls per step (no noise)
    .venv/bin/python scripts/bench/bench_step.py --tiny-only --repeats 15
    .venv/bin/python scripts/bench/bench_step.py --turns --repeats 10  # steps of one turn
    .venv/bin/python scripts/bench/bench_step.py --accelerator gpu --precision bf16-mixed

On a GPU the raw loop moves each batch to the device and runs under
``torch.autocast(bfloat16)``, the Lightning cases use ``precision="bf16-mixed"``.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import re
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import bench_args, interleave, machine, paired_ratio, quiet_trainer, table

from examples.digits.data import DigitsDataModule, images_to_float  # noqa: E402
from examples.digits.module import ClassifierModule  # noqa: E402
from examples.digits.network import MLP, SmallCNN  # noqa: E402
from examples.digits.prepare import prepare  # noqa: E402
from train_template.checkpointing import RunCheckpoint  # noqa: E402
from train_template.options import LRSchedule  # noqa: E402
from train_template.planned_trainer import PlannedTrainer  # noqa: E402
from train_template.schedule import PlannedLRLambda  # noqa: E402
from train_template.steps import template_callbacks  # noqa: E402

SIZES = {
    # name: (network factory, batch size, epochs: the first warms up, the others are timed)
    "tiny (MLP 64-128-10, batch 32)": (lambda: MLP(64, 10, 128), 32, 11),  # 450 timed steps
    "compute-bound (CNN width 256, batch 256)": (lambda: SmallCNN(10, 1, 8, 256, 0.0), 256, 4),
}


def sync() -> None:
    """Queued GPU work counts: wait for it before reading the clock."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class EpochTimer(pl.Callback):
    """Milliseconds per step of every epoch after the first; a fit's figure is the fastest
    of them: what the step costs when nothing else interferes (a garbage-collector pass,
    the machine's neighbours: they only ever add time; ``timeit``'s rule). On this shared
    VM, 9 identical bare fits' fastest epochs lay within 1.185 - 1.257 ms, most within 2%;
    their medians, on a busier hour, 1.23 - 2.06 ms (docs/benchmarks.md, 1g)."""

    def __init__(self, profile: cProfile.Profile | None = None) -> None:
        self.epochs: list[float] = []
        self.steps = 0
        self.profile = profile  # --calls: counts the Python calls of the timed epochs

    def on_train_epoch_start(self, trainer, pl_module):
        sync()
        if self.profile is not None and trainer.current_epoch > 0:
            self.profile.enable()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        sync()
        if self.profile is not None:
            self.profile.disable()
        if trainer.current_epoch > 0:
            seconds = time.perf_counter() - self.start
            self.epochs.append(seconds / trainer.num_training_batches * 1000)
            self.steps += trainer.num_training_batches

    @property
    def ms_per_step(self) -> float:
        return min(self.epochs)


def template_epoch(
    data_dir: Path,
    network,
    batch_size: int,
    epochs: int,
    log_dir: str,
    example: bool,
    timer: EpochTimer | None = None,
    **device,
) -> float:
    """The machinery as the CLI sets it up; with the bare module (``example=False``) the
    difference to "bare Lightning" is the template's own per-step cost."""
    torch.manual_seed(0)
    if example:
        model = ClassifierModule(network(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    else:
        model = BareModule(network())
    data = DigitsDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    timer = timer or EpochTimer()
    # Every callback the CLI adds to a fit (RunCheckpoint saves at epoch ends, after the
    # timer has stopped; its per-step hook is timed).
    checkpoint = RunCheckpoint(dirpath=str(Path(log_dir) / "checkpoints"), save_last=True)
    trainer = quiet_trainer(
        [
            *template_callbacks(
                lr_schedule=LRSchedule(warmup_fraction=0.05), checkpoint=checkpoint
            ),
            timer,
        ],
        log_dir,
        logger=pl.loggers.CSVLogger(log_dir),
        log_every_n_steps=10,  # as configs/default.yaml
        trainer_class=PlannedTrainer,
        max_epochs=epochs,
        enable_checkpointing=True,
        **device,
    )
    trainer.fit(model, data)  # epoch 1 warms up; the timer keeps the others
    return timer.ms_per_step


class BareModule(pl.LightningModule):
    """The least Lightning can run: no logging, no metrics, no callbacks."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.network(batch["image"]), batch["label"])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        factor = PlannedLRLambda(LRSchedule(), 0, 10**6)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def bare_lightning_epoch(
    data_dir: Path,
    network,
    batch_size: int,
    epochs: int,
    log_dir: str,
    checkpoint: bool = False,
    timer: EpochTimer | None = None,
    **device,
) -> float:
    """``checkpoint``: Lightning's default ModelCheckpoint, a save at every epoch end (as
    the template's default), outside the timed epochs like the template's."""
    torch.manual_seed(0)
    data = DigitsDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    timer = timer or EpochTimer()
    trainer = quiet_trainer(
        [timer],
        str(Path(log_dir) / "bare"),
        max_epochs=epochs,
        enable_checkpointing=checkpoint,
        **device,
    )
    trainer.fit(BareModule(network()), data)
    return timer.ms_per_step


def raw_epoch(
    data_dir: Path, network, batch_size: int, epochs: int, accelerator: str, precision: str
) -> float:
    torch.manual_seed(0)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    net = network().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = DigitsDataModule(str(data_dir), batch_size=batch_size, shuffle=True)
    data.setup("fit")
    loader = data.train_dataloader()
    factor = PlannedLRLambda(LRSchedule(), len(loader) // 20, epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    seconds = 0.0
    for epoch in range(epochs):  # epoch 1 warms up like the template's
        sync()
        start = time.perf_counter()
        for batch in loader:
            batch = images_to_float({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            images, labels = batch["image"], batch["label"]
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = torch.nn.functional.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        sync()
        if epoch > 0:
            seconds += time.perf_counter() - start
    return seconds / ((epochs - 1) * len(loader)) * 1000


class Turns:
    """Fits in threads of one process that run in turns, one at a time (``TurnTimer``):
    a step of one fit lies a few milliseconds from a step of each other fit, so the
    changes of this VM's speed (identical fits differ by up to 5%; a fixed loop's time
    swings 2x from one second to the next) meet every fit alike, and the ratio of steps
    of the same turn holds what the fits do differently. A thread that waits holds no
    lock Python's interpreter needs: the one that runs is alone."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.turn = names[0]
        self.done: set[str] = set()
        self.changed = threading.Condition()

    def take(self, name: str) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.turn == name)

    def pass_on(self, name: str, done: bool = False) -> None:
        with self.changed:
            if done:
                self.done.add(name)
            start = self.names.index(name)
            following = self.names[start + 1 :] + self.names[: start + 1]
            self.turn = next((n for n in following if n not in self.done), name)
            self.changed.notify_all()


STEPS_PER_TURN = 10


class TurnTimer(pl.Callback):
    """Runs its fit in turns of ``STEPS_PER_TURN`` steps (``Turns``) and times each step
    after the warm-up epoch from one batch start to the next, but the first step of a
    turn (the caches hold the other fits' data then) and the step across an epoch end
    (its saves): the steps of a fit that runs alone. On a GPU the clock waits for the
    queue at every step, which the steps of a normal fit do not: the turns are for the
    Python-bound tiny size on a CPU."""

    def __init__(self, turns: Turns, name: str) -> None:
        self.turns, self.name = turns, name
        self.steps_ms: list[float] = []
        self.started, self.in_turn, self.last = False, 0, None

    def on_train_epoch_start(self, trainer, pl_module):
        self.last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        now = time.perf_counter()
        if self.last is not None and trainer.current_epoch > 0:
            self.steps_ms.append((now - self.last) * 1000)
        if self.in_turn == STEPS_PER_TURN or not self.started:
            if self.started:
                self.turns.pass_on(self.name)
            self.turns.take(self.name)
            self.started, self.in_turn = True, 0
        self.in_turn += 1
        self.last = None if self.in_turn == 1 else now  # a turn's first step: not timed

    @property
    def ms_per_step(self) -> float:
        return statistics.median(self.steps_ms)


def fit_in_turn(fit, name: str, turns: Turns, timer: TurnTimer, root: str, shape: tuple) -> None:
    """One of ``in_turns``' fits; its turn passes on for good when it ends, also on an error."""
    data_dir, network, batch_size, epochs, device = shape
    # OpenMP's thread count is the calling thread's: a new thread starts with every core's
    # worth, whose idle workers spin on the one core the fits share.
    torch.set_num_threads(1)
    try:
        fit(data_dir, network, batch_size, epochs, root, timer=timer, **device)
    finally:
        turns.pass_on(name, done=True)


def in_turns(data_dir: Path, log_dir: str, rounds: int, **device) -> str:
    """The tiny Lightning fits run in turns in one process (``Turns``, ``TurnTimer``):
    ms per step, and each fit's steps against bare Lightning's steps of the same turn.
    Every fit runs in a thread of its own: with the template in the main thread, bare
    Lightning in its place stepped at 1.018x bare Lightning in a thread (4 rounds; 1.003x
    with both in threads). The template's fit then warns that it catches no signal."""
    network, batch_size, epochs = SIZES["tiny (MLP 64-128-10, batch 32)"]
    shape = (data_dir, network, batch_size, epochs, device)
    fits = {
        "bare Lightning": bare_lightning_epoch,
        "template machinery": partial(template_epoch, example=False),
        "bare Lightning + epoch-end checkpoint": partial(bare_lightning_epoch, checkpoint=True),
    }
    template, bare = "template machinery", "bare Lightning"
    steps_ms: dict[str, list[float]] = {name: [] for name in fits}
    for round_index in range(rounds):
        names = list(fits) if round_index % 2 == 0 else list(fits)[::-1]
        turns = Turns(names)
        timers = {name: TurnTimer(turns, name) for name in names}
        roots = {
            name: str(Path(log_dir) / f"turns{round_index}-{i}") for i, name in enumerate(names)
        }
        threads = [
            threading.Thread(
                target=fit_in_turn, args=(fits[n], n, turns, timers[n], roots[n], shape)
            )
            for n in names
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, timer in timers.items():
            steps_ms[name] += timer.steps_ms
        ratio = same_turn_ratio(timers[template].steps_ms, timers[bare].steps_ms)
        print(
            f"  round {round_index + 1}/{rounds} done: {template} / {bare} {ratio:.3f}x",
            file=sys.stderr,
            flush=True,
        )
    lines = [
        f"## tiny (MLP 64-128-10, batch 32), in turns: ms per optimizer step "
        f"({len(steps_ms[bare])} steps of each fit, {rounds} rounds)",
        "",
        f"| case | median ms per step | / {bare}, median of the same turns' step ratios |",
        "| --- | ---: | ---: |",
    ]
    for name, values in steps_ms.items():
        ratio = same_turn_ratio(values, steps_ms[bare])
        lines.append(f"| {name} | {statistics.median(values):.4g} | {ratio:.3f}x |")
    return "\n".join(lines)


def same_turn_ratio(case: list[float], baseline: list[float]) -> float:
    """The median of step i of ``case`` / step i of ``baseline``: steps of the same turn
    (every fit times the same steps of the same turns)."""
    return statistics.median(a / b for a, b in zip(case, baseline, strict=True))


def hook_costs(data_dir: Path, log_dir: str, **device) -> str:
    """The template's callback hooks at the tiny size, timed by Lightning's SimpleProfiler
    (per hook: microseconds per optimizer step), beside the whole training batch."""
    from lightning.pytorch.profilers import SimpleProfiler

    network, batch_size, epochs = SIZES["tiny (MLP 64-128-10, batch 32)"]
    torch.set_num_threads(1)
    profiler = SimpleProfiler()
    checkpoint = RunCheckpoint(dirpath=str(Path(log_dir) / "hooks"), save_last=True)
    trainer = quiet_trainer(
        template_callbacks(lr_schedule=LRSchedule(warmup_fraction=0.05), checkpoint=checkpoint),
        log_dir,
        logger=pl.loggers.CSVLogger(log_dir),
        log_every_n_steps=10,
        trainer_class=PlannedTrainer,
        enable_checkpointing=True,
        max_epochs=epochs,
        profiler=profiler,
        **device,
    )
    trainer.fit(BareModule(network()), DigitsDataModule(str(data_dir), batch_size=batch_size))
    steps = trainer.global_step
    rows = []
    for key, durations in profiler.recorded_durations.items():
        if key.startswith("[Callback]") and len(durations) >= steps:
            name = re.sub(r"\{.*\}", "", key.removeprefix("[Callback]"))
            rows.append((sum(durations) / steps * 1e6, name))
    batch = sum(profiler.recorded_durations["run_training_batch"]) / steps * 1e6
    lines = ["| hook | us per step |", "| --- | ---: |"]
    lines += [f"| {name} | {us:.1f} |" for us, name in sorted(rows, reverse=True)]
    total = sum(us for us, _ in rows)
    lines += [
        f"| **all template hooks** | **{total:.1f}** |",
        f"| (whole training batch) | {batch:.0f} |",
    ]
    return "\n".join(lines)


def call_counts(data_dir: Path, log_dir: str, **device) -> str:
    """Python function calls per optimizer step in the timed epochs (cProfile), bare
    Lightning vs the template's machinery at the tiny size: a per-step cost that no
    neighbour on the machine changes."""
    network, batch_size, epochs = SIZES["tiny (MLP 64-128-10, batch 32)"]
    torch.set_num_threads(1)
    lines = ["| case | Python calls per step |", "| --- | ---: |"]
    counts = []
    for name, fit in (
        ("bare Lightning", bare_lightning_epoch),
        ("template machinery", partial(template_epoch, example=False)),
        ("bare Lightning + epoch-end checkpoint", partial(bare_lightning_epoch, checkpoint=True)),
    ):
        timer = EpochTimer(cProfile.Profile())
        fit(data_dir, network, batch_size, epochs, log_dir, timer=timer, **device)
        calls = sum(entry[1] for entry in pstats.Stats(timer.profile).stats.values())
        counts.append(calls / timer.steps)
        lines.append(f"| {name} | {counts[-1]:.0f} |")
    lines.append(f"| **template machinery / bare Lightning** | **{counts[1] / counts[0]:.3f}x** |")
    return "\n".join(lines)


def main() -> None:
    args = bench_args(
        __doc__,
        device=True,
        flags=[
            ("hooks", "time the template's own hooks"),
            ("calls", "count the Python calls per step"),
            ("tiny_only", "time the tiny size only (the per-step cost goal)"),
            ("turns", "the tiny Lightning fits in turns of a few steps, in one process"),
        ],
    )
    device = {"accelerator": args.accelerator, "precision": args.precision}
    threads = torch.get_num_threads()
    cores = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "digits"
        prepare("digits", data_dir, num_workers=0, log=lambda *_: None)
        if args.hooks:
            print(f"# The template's hooks, tiny size\n\n{machine()}\n")
            print(hook_costs(data_dir, tmp, **device))
            return
        if args.turns:
            torch.set_num_threads(1)
            os.sched_setaffinity(0, {max(cores)})
            print(f"# Per-step time, the fits in turns\n\n{machine()}, {device}\n")
            print(in_turns(data_dir, tmp, args.repeats, **device))
            return
        if args.calls:
            print(f"# Python calls per step, tiny size\n\n{machine()}\n")
            print(call_counts(data_dir, tmp, **device))
            return
        print(f"# Per-step time: template vs raw loop\n\n{machine()}, {device}\n")
        sizes = list(SIZES.items())[:1] if args.tiny_only else SIZES.items()
        for size, (network, batch_size, epochs) in sizes:
            # The tiny size measures Python-side cost per step; two intra-op threads only add
            # thread hand-off jitter to its microsecond kernels.
            torch.set_num_threads(1 if size.startswith("tiny") else threads)
            # One thread on one core: no migrations between the two cores mid-epoch.
            os.sched_setaffinity(0, {max(cores)} if size.startswith("tiny") else cores)
            shape = (data_dir, network, batch_size, epochs)
            results = interleave(
                {
                    "raw PyTorch loop": lambda s=shape: raw_epoch(*s, **device),
                    "bare Lightning": lambda s=shape: bare_lightning_epoch(*s, tmp, **device),
                    "bare Lightning + epoch-end checkpoint": lambda s=shape: bare_lightning_epoch(
                        *s, tmp, checkpoint=True, **device
                    ),
                    "template machinery": lambda s=shape: template_epoch(*s, tmp, False, **device),
                    "template + example module": lambda s=shape: template_epoch(
                        *s, tmp, True, **device
                    ),
                },
                args.repeats,
            )
            print(table(f"{size}: ms per optimizer step", results, "ms", "raw PyTorch loop"))
            median = {name: statistics.median(v) for name, v in results.items()}
            fastest = {name: min(v) for name, v in results.items()}
            machinery, bare = "template machinery", "bare Lightning"
            saving = "bare Lightning + epoch-end checkpoint"
            print(
                f"\ntemplate machinery / bare Lightning (same module): "
                f"{median[machinery] / median[bare]:.3f}x by median, "
                f"{fastest[machinery] / fastest[bare]:.3f}x by fastest run, "
                f"{paired_ratio(results, machinery, bare):.3f}x paired (median of each "
                f"round's ratio); / bare Lightning + epoch-end checkpoint: "
                f"{median[machinery] / median[saving]:.3f}x by median, "
                f"{paired_ratio(results, machinery, saving):.3f}x paired\n"
            )


if __name__ == "__main__":
    main()
