"""Launch-environment checks, run before the Trainer starts.

Lightning detects torchrun (``TorchElasticEnvironment``) and SLURM
(``SLURMEnvironment``) on its own; what it does not do is tell you, in one line,
that the launcher's process count and the Trainer's ``devices x num_nodes`` disagree
(Lightning then hangs or fails deep inside process-group setup). Nothing inside the
training loop knows how it was launched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from train_template.errors import UserError


def requested_world_size(devices, num_nodes: int) -> int | None:
    """devices x num_nodes when devices is a count or list; None for 'auto'/-1."""
    if isinstance(devices, (list, tuple)):
        return len(devices) * num_nodes
    if isinstance(devices, str):
        if devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        elif "," in devices:
            return len([d for d in devices.split(",") if d.strip()]) * num_nodes
        else:
            return None
    if isinstance(devices, int) and devices > 0:
        return devices * num_nodes
    return None


def in_slurm_job(environ: Mapping[str, str] = os.environ) -> bool:
    """True where Lightning's SLURMEnvironment would take over (not an interactive shell)."""
    return "SLURM_NTASKS" in environ and environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def check_environment(devices, num_nodes: int, environ: Mapping[str, str] = os.environ) -> None:
    """Raise UserError when the launcher and the Trainer settings cannot work together."""
    want = requested_world_size(devices, num_nodes)
    slurm_tasks = environ.get("SLURM_NTASKS")
    in_slurm_step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    if in_slurm_job(environ):
        if not in_slurm_step and int(slurm_tasks) > 1:
            raise UserError(
                f"this SLURM job has {slurm_tasks} tasks but the script was not started with srun: "
                "launch it as `srun python train.py ...` (see scripts/slurm/train.sbatch)"
            )
        if in_slurm_step and want is not None and int(slurm_tasks) != want:
            raise UserError(
                f"SLURM started {slurm_tasks} tasks but --trainer.devices x --trainer.num_nodes = "
                f"{devices} x {num_nodes} = {want}: set --ntasks-per-node to the devices per node "
                "and --nodes to num_nodes, or change the trainer settings"
            )
    torchrun_world = environ.get("WORLD_SIZE") if "TORCHELASTIC_RUN_ID" in environ else None
    if torchrun_world is not None and want is not None and int(torchrun_world) != want:
        raise UserError(
            f"torchrun started {torchrun_world} processes but --trainer.devices x "
            f"--trainer.num_nodes = {devices} x {num_nodes} = {want}: make --nproc_per_node x "
            "--nnodes equal to devices x num_nodes"
        )


def torchrun_layout(
    devices, num_nodes: int, environ: Mapping[str, str] = os.environ
) -> tuple[Any, int]:
    """Under torchrun with ``--trainer.devices auto``: the launcher's layout.

    torchrun decides how many processes run on how many nodes, and in its elastic mode
    (``--nnodes 1:2``) a restart after a lost node has fewer. Its workers are told
    ``LOCAL_WORLD_SIZE`` (processes on this node) and ``GROUP_WORLD_SIZE`` (nodes in the
    round), so with devices left at ``auto`` they become ``devices`` and ``num_nodes``
    (a ``--trainer.num_nodes`` other than 1 must agree). Explicit devices are kept and
    checked by ``check_environment``; outside torchrun nothing changes.
    """
    local = environ.get("LOCAL_WORLD_SIZE", "")
    nodes = environ.get("GROUP_WORLD_SIZE", "")
    auto = devices in (None, "auto", -1, "-1")
    if (
        "TORCHELASTIC_RUN_ID" not in environ
        or not auto
        or not (local.isdigit() and nodes.isdigit())
    ):
        return devices, num_nodes
    if num_nodes not in (1, int(nodes)):
        raise UserError(
            f"torchrun started {nodes} node(s) but --trainer.num_nodes={num_nodes}: leave "
            "--trainer.num_nodes out under torchrun (the launcher's --nnodes decides), or "
            "give --trainer.devices explicitly"
        )
    return int(local), int(nodes)


def check_strategy(strategy) -> None:
    """FSDP1 (Lightning's ``FSDPStrategy``, ``--trainer.strategy fsdp``) gathers whole
    state dicts and has none of the template's sharded checkpoints: one line pointing at
    FSDP2 (``configs/fsdp.yaml``) instead."""
    name = strategy if isinstance(strategy, str) else str(getattr(strategy, "class_path", ""))
    if name.lower().startswith("fsdp") or name.endswith("FSDPStrategy"):
        raise UserError(
            f"--trainer.strategy {name} is FSDP1, which the template does not checkpoint or "
            "resume: use --config configs/fsdp.yaml (FSDP2 through ModelParallelStrategy; on "
            "a CPU add --trainer.accelerator cpu --trainer.precision 32-true)"
        )


def global_rank_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank before any process group exists: torchrun's RANK,
    SLURM's SLURM_PROCID, or Lightning's own launcher (LOCAL_RANK on one node; the
    process that launches the others has none of them and is rank 0)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0
