"""The network: a plain ``nn.Module`` with no training code (swap in your own)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; about 20k parameters at the default size.

    Sized for 8x8 digits but works for any square single- or multi-channel image
    whose side is divisible by 4.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        width: int = 32,
        dropout: float = 0.1,
    ) -> None:
        """
        Args:
            num_classes: Number of output classes.
            in_channels: Channels of the input images.
            image_size: Side length of the (square) input images; must be divisible by 4.
            width: Channels of the first conv block (the second has twice as many).
            dropout: Dropout before the classifier head.
        """
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size={image_size} must be divisible by 4")
        self.in_channels = in_channels
        self.image_size = image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * side * side, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.view(-1, self.in_channels, self.image_size, self.image_size)
        return self.head(self.features(images))


class MLP(nn.Module):
    """A flat MLP: the cheapest network, used by the overhead benchmark's tiny case."""

    def __init__(self, num_inputs: int = 64, num_classes: int = 10, hidden: int = 128) -> None:
        """
        Args:
            num_inputs: Input features (pixels x channels).
            num_classes: Number of output classes.
            hidden: Width of the hidden layer.
        """
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(num_inputs, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
