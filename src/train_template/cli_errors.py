"""How a failed command ends: one ``error:`` line, no traceback, for every error the user
fixes (exit status 2) and every fault of the run's surroundings (a lost peer, an object
store gone: exit status 1). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from train_template import launch, storage
from train_template.distributed import lost_peer_line
from train_template.errors import UserError


def report(error: BaseException) -> None:
    """End the process with the one line ``error`` deserves; return (the caller re-raises)
    when it is a bug."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    text = str(error)
    if isinstance(error, UserError):
        fail(text)
    if (first := user_error_behind(error)) is not None:
        # Lightning's clean-up after the template stopped the run (loggers finalizing on a
        # full disk) raised again: the template's line is the one that says what to change.
        fail(str(first))
    if isinstance(error, MisconfigurationException):  # Lightning's "fix your settings"
        fail(" ".join(text.split()))
    if isinstance(error, ValueError) and "Does not validate against any of the Union" in text:
        # jsonargparse wraps an error raised in a --model/--data class's __init__ in its
        # union explanation; the class's own one-line message is inside.
        fail(parser_error_line(text))
    if type(error).__name__ == "ArgumentError":  # jsonargparse's bad options
        fail(with_renamed_hint(parser_error_line(text)))
    lost = lost_peer_line(error) if isinstance(error, RuntimeError) else None
    if lost or (lost := storage.outage_line(error)):
        # Other ranks may wait for this one, and a group cannot be closed without its lost
        # peer: leave without waiting.
        leave(lost)
    if isinstance(error, RuntimeError) and "Error(s) in loading state_dict" in text:
        # torch's strict load_state_dict lists every key over many lines: name the first.
        first = next(line.strip() for line in text.splitlines()[1:] if line.strip())
        fail(
            f"the checkpoint holds a different model ({first[:200]}): use a checkpoint of "
            "this model, or the --model settings it was trained with"
        )


def with_renamed_hint(line: str) -> str:
    """Options renamed in this version: an old name is refused with its new name."""
    if "arguments are required" in line and re.search(r"\b(model|data)\b", line):
        return (
            f"{line}: select your LightningModule and LightningDataModule with --model "
            "CLASS_PATH and --data CLASS_PATH, or name them in configs/default.yaml"
        )
    if "unrecognized" not in line and "elastic" not in line:
        return line
    if "--plan.warmup" in line or ("lr_schedule" in line and "model" in line):
        return (
            f"{line}: the whole LR curve is --lr_schedule.* now (warmup_steps, warmup_epochs, "
            "warmup_fraction, decay, final_lr_factor, warmup_start_factor, stable_fraction)"
        )
    if "elastic" in line:
        return (
            f"{line}: --data.elastic is --data.global_order now (the global sample order; "
            "torchrun's elastic mode needs no option)"
        )
    return line


_UNION_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "- Expected a <class 'NoneType'>",
)


def parser_error_line(message: str) -> str:
    """jsonargparse's nested, multi-line explanation -> its one relevant line.

    With ``--model``/``--data`` in subclass mode every bad option is wrapped in union
    errors ("Does not validate against any of the Union subtypes ... NoneType"); what
    the user needs is the option's full key and the innermost reason.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_UNION_NOISE)]
    if not useful:
        return " ".join(lines)[:400]
    reason = useful[-1].removeprefix("- ")
    if reason.startswith("--"):  # the template's own one-line error, raised in __init__
        return reason
    keys = [k for line in useful for k in re.findall(r'^Parser key "([^"]+)"', line)]
    before = useful[-2].removeprefix("- ") if len(useful) > 1 else ""
    if before.startswith("Problem with given class_path"):
        reason = f"{before} {reason}"
    line = f'Parser key "{".".join(keys)}": {reason}' if keys else " ".join(useful)
    return line if len(line) < 400 else line[:397] + "..."


def user_error_behind(error: BaseException) -> UserError | None:
    """A UserError this error was raised while handling (its ``__context__`` chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return error
        error = error.__context__
    return None


def error_line(message: str) -> str:
    rank = launch.global_rank_from_env()
    return f"{'error' if rank == 0 else f'error (rank {rank})'}: {message}"


def leave(message: str) -> NoReturn:
    """One error line and exit status 1 at once: a fault of the run's surroundings (a
    lost peer, an object store gone), not of its settings; no clean-up that could wait
    on a peer or on the store."""
    sys.stdout.flush()
    print(error_line(message), file=sys.stderr, flush=True)
    os._exit(1)


def fail(message: str) -> NoReturn:
    print(error_line(message), file=sys.stderr)
    if in_a_group_of_several():
        # Every rank reports its error and leaves. An ordinary exit would run the
        # interpreter's shutdown with gloo's threads still holding tensors of the open
        # group, which aborts ("terminate called without an active exception", status 134
        # instead of 2); the group cannot be closed here (a peer may sit in a collective).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)


def in_a_group_of_several() -> bool:
    """This process is in an initialised process group of more than one rank."""
    if "torch.distributed" not in sys.modules:  # a parse error: no torch import for it
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
