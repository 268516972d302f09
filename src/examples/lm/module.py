"""The language-model LightningModule: next-token cross-entropy, planned LR, generation.

``val/loss`` is the mean cross-entropy in nats per token over the held-out files
(every token weighted equally, whatever the batch). ``predict`` samples a
continuation of each prompt and returns its text (``predictions.txt``). Like the
digits module, it uses the machinery only through ``planned_optimization`` and
``is_logging_step``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from examples.lm.network import TinyTransformer
from examples.lm.prepare import decode, encode
from train_template import is_logging_step, planned_optimization


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)


class LanguageModule(pl.LightningModule):
    """Causal LM over token batches ``(batch, context + 1)``."""

    def __init__(
        self,
        network: nn.Module | None = None,
        optimizer: OptimizerCallable = _adamw,
        new_tokens: int = 200,
        temperature: float = 0.8,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        """
        Args:
            network: Token ids -> next-token logits (default: ``TinyTransformer()``).
            optimizer: Optimizer factory; its ``lr`` is the peak LR of ``--lr_schedule``.
            new_tokens: Tokens ``predict`` generates per prompt.
            temperature: Sampling temperature of ``predict``.
            seed: Seed of ``predict``'s sampling.
            compile: ``torch.compile`` each transformer block (in place: the parameter
                names, so the checkpoints, are the same with it on or off).
        """
        super().__init__()
        self.network = network if network is not None else TinyTransformer()
        self.optimizer_factory = optimizer
        self.new_tokens = new_tokens
        self.temperature = temperature
        self.seed = seed
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.compile_blocks = compile
        self._compiled = False

    def configure_model(self) -> None:
        """``compile``: each block compiled on its own, then, under ``configs/fsdp.yaml`` (a
        ``ModelParallelStrategy``), FSDP2 shards each block and then the rest (embeddings,
        tied head), as torchtitan does; unsharded otherwise. ``nn.Module.compile`` compiles
        in place, so no ``_orig_mod.`` enters the parameter names."""
        if self.compile_blocks and not self._compiled:
            for block in self.network.blocks:
                block.compile()
            self._compiled = True
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.network, FSDPModule):
            return  # sharded already (configure_model may be called again)
        for block in self.network.blocks:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self.network, mesh=mesh["data_parallel"])

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self.network(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        # Only on the steps Lightning writes (every log_every_n_steps), as in the digits module.
        if is_logging_step(self.trainer):
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), batch[:, 1:].numel())
        self.log("val/loss", self.val_loss, prog_bar=True)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.test_loss.update(self._loss(batch), batch[:, 1:].numel())
        self.log("test/loss", self.test_loss)

    def predict_step(self, prompt: str, batch_idx: int) -> dict[str, list[str]]:
        generator = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)
        tokens = encode(prompt.encode()).long().to(self.device)[None]
        out = self.network.generate(tokens, self.new_tokens, self.temperature, generator)
        return {"text": [prompt + decode(out[0, tokens.shape[1] :].tolist())]}

    def configure_optimizers(self) -> dict:
        # The run's LR curve (--lr_schedule.*), as long as the training plan.
        return planned_optimization(self.optimizer_factory(self.parameters()), self.trainer)
