"""A lost peer ends the job in bounded time, with one line (``--distributed.timeout_s``).

Lightning's default process-group timeout is 30 minutes: when a node hangs or its link
goes down (packets just stop, no connection is reset), every other rank waits that long
in its next collective while the whole allocation burns. ``--distributed.timeout_s``
bounds that wait: it is the process group's timeout, which every backend applies.

- gloo (CPU): a collective that gets no answer within the timeout raises; a peer that
  died with its connections reset raises at once. ``lost_peer_line`` turns either into
  one ``error:`` line (which peer, or the timeout, and how to go on), and the rank
  leaves without waiting for a group that cannot be closed.
- NCCL (GPU): the same value is the NCCL watchdog's timeout. A collective that runs past
  it is aborted by the watchdog thread, which with torch's default
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` tears the process down (torch prints its own
  watchdog message, not this module's line). Either way the rank exits non-zero, the
  launcher (torchrun, srun ``--kill-on-bad-exit``) ends the others, and a relaunch with
  ``--ckpt_path auto`` resumes from the last checkpoint.

Keep the timeout above the longest legitimate wait between two collectives: the slowest
rank's checkpoint save, a validation pass on rank 0 alone, the first step's compile.
"""

from __future__ import annotations

import re

# What torch's backends raise when a peer is gone (torch 2.15: gloo's tcp transport,
# the TCPStore, NCCL's error reporting), in the order they are looked for.
LOST_PEER_PATTERNS = (
    (r"Timed out waiting (\d+)ms", "no answer from a peer for {seconds} s"),
    (r"(?i)timeout caused pair closure", "no answer from a peer within --distributed.timeout_s"),
    (r"Connection closed by peer \[([^\]]+)\]", "the peer at {peer} closed its connection"),
    (r"Connection reset by peer", "a peer reset its connection"),
    (r"Connection refused", "a peer refused the connection"),
    (r"Broken pipe", "a peer's connection broke"),
    (r"(?i)watchdog caught collective operation timeout", "a collective timed out"),
    (r"(?i)NCCL communicator was aborted", "a peer's NCCL communicator was aborted"),
)


def lost_peer_line(error: BaseException) -> str | None:
    """One line for an error that means a peer rank is gone; None for any other error."""
    import torch.distributed as dist

    text = str(error)
    # gloo's own messages do not always name it ("Application timeout caused pair closure").
    markers = ("gloo", "NCCL", "c10d", "pair closure")
    is_distributed = isinstance(error, dist.DistError) or any(m in text for m in markers)
    if not isinstance(error, RuntimeError) or not is_distributed:
        return None
    for pattern, reason in LOST_PEER_PATTERNS:
        found = re.search(pattern, text)
        if found:
            value = found.group(1) if found.groups() else ""
            seconds = f"{int(value) / 1000:g}" if value.isdigit() else ""
            reason = reason.format(seconds=seconds, peer=value)
            return (
                f"a peer rank was lost ({reason}): the job cannot go on with fewer ranks; "
                "relaunch it with --ckpt_path auto (it resumes from the last checkpoint), "
                "and raise --distributed.timeout_s if the peer was only slow"
            )
    return None
