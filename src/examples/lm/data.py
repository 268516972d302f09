"""The language-model data module: packed byte tokens read with litdata's ``TokensLoader``.

Each sample is ``context + 1`` consecutive tokens (the model reads the first
``context`` and predicts the last ``context``); a batch is a ``(batch, context + 1)``
int64 tensor once on the device. Streaming, sharding, padding, the plan's token
count (``tokens_per_sample``) and exact resume come from ``StreamingDataModule``.
``predict`` runs over a few text prompts instead of the shards.
"""

from __future__ import annotations

from typing import Any

import torch
from litdata.streaming.item_loader import TokensLoader
from torch.utils.data import DataLoader

from train_template import StreamingDataModule

DEFAULT_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\nclass ",
    "    for key, value in ",
    '    """Return the ',
)


def samples_in(batch: Any) -> int:
    """Samples in a batch (for Lightning's ThroughputMonitor); a predict batch is one prompt."""
    return 1 if isinstance(batch, str) else int(batch.shape[0])


def tokens_in(batch: Any) -> int:
    """Tokens the model trains on in a batch: ``context`` per sample (predict: the prompt's)."""
    if isinstance(batch, str):
        return len(batch.encode())
    return int(batch.shape[0] * (batch.shape[1] - 1))


def _single_prompt(prompts: list[str]) -> str:
    return prompts[0]


class TokenDataModule(StreamingDataModule):
    """Token shards written by ``examples.lm.prepare`` (the stdlib source by default).

    ``fit`` on the default ``data_dir`` builds the shards first when they are missing
    (``prepare_data``, one process per node, under a file lock).
    """

    prepare_command = "python scripts/prepare_lm_data.py --out {data_dir}"

    def __init__(
        self,
        data_dir: str = "data/stdlib",
        context: int = 128,
        prompts: tuple[str, ...] = DEFAULT_PROMPTS,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            data_dir: Root of the token shards (``train/``, ``val/``, ``test/``); a local
                path or a URL litdata understands.
            context: Tokens the model reads per sample (samples are ``context + 1`` long).
            prompts: Texts ``predict`` continues.
        """
        super().__init__(data_dir=data_dir, **kwargs)
        self.context = context
        self.prompts = list(prompts)

    @property
    def tokens_per_sample(self) -> int:
        """Tokens trained on per sample, for the plan's token budget (``--plan.max_tokens``)."""
        return self.context

    def prepare_data(self) -> None:
        if self.data_dir == "data/stdlib":
            from examples.lm.prepare import prepare

            prepare(self.data_dir)

    def item_loader(self) -> TokensLoader:
        return TokensLoader(block_size=self.context + 1)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Tokens travel as uint8 (bytes) and become int64 ids on the device.
        return batch.long() if isinstance(batch, torch.Tensor) else batch

    def setup(self, stage: str) -> None:
        if stage != "predict":  # predict reads the prompts, not the shards
            super().setup(stage)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_size=1, collate_fn=_single_prompt)
