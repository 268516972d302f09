"""The known-harmless messages of Lightning, torch and litdata, silenced narrowly by text.

Each entry says why it does not apply here. Every other warning stays visible: a run
that prints nothing it does not mean teaches nobody to ignore warnings.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator

# (message regex, why it is harmless here)
HARMLESS_WARNINGS = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning 2.6's pytree helper against torch's newer pytree API; nothing to act on",
    ),
    (
        r"Your `IterableDataset` has `__len__` defined",
        "litdata shards its stream per rank and per worker itself, so __len__ is exact",
    ),
)
# (logger, text, why)
HARMLESS_LOG_LINES = (
    (
        "lightning.pytorch.utilities.rank_zero",
        "try installing [litmodels]",
        "an advertisement for a cloud model registry",
    ),
    (
        "lightning.pytorch.utilities.rank_zero",
        "to enable LitLogger",
        "an advertisement for a cloud experiment tracker",
    ),
    (
        "litdata.streaming.dataset",
        "disabled the `drop_last` option",
        "short ranks are padded (even_batches.EvenBatchesLoader), so collectives never stall",
    ),
)
# Printed (not warned) by litdata.optimize in the main process.
HARMLESS_PRINTS = ("Create an account on https://lightning.ai/",)


class _DropText(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_messages() -> None:
    """Install the filters (idempotent); called by the CLI and the scripts at start-up."""
    for pattern, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, text, _why in HARMLESS_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))


class _LineFilter(io.TextIOBase):
    """A stdout that drops whole lines containing one of ``HARMLESS_PRINTS``."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not any(banner in line for banner in HARMLESS_PRINTS):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not any(banner in self.pending for banner in HARMLESS_PRINTS):
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()


@contextlib.contextmanager
def without_banners() -> Iterator[None]:
    """Run litdata's preparation with its sign-up banner dropped from stdout."""
    filtered = _LineFilter(sys.stdout)
    with contextlib.redirect_stdout(filtered):
        try:
            yield
        finally:
            filtered.flush()
