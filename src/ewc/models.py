"""Reference models for the benchmarks: an MLP and the seed notebook's small CNN.

Any ``nn.Module`` works with the library; these exist so that published protocols can be
reproduced by name (``--model mlp|cnn``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

MODEL_NAMES = ("mlp", "cnn")


class MLP(nn.Sequential):
    """Fully connected ReLU network: flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

    Args:
        in_features: number of input features per sample (e.g. 784 for 28x28 images).
        n_outputs: width of the output layer (logits).
        hidden: widths of the hidden layers, e.g. ``(400, 400)`` (Hsu et al. 2018) or
            ``(1000, 1000)`` (van de Ven et al. 2022).
        dropout: dropout probability after each hidden layer (0 disables it).
    """

    def __init__(
        self,
        in_features: int,
        n_outputs: int,
        hidden: Sequence[int] = (400, 400),
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_outputs))
        super().__init__(*layers)


class SimpleCNN(nn.Sequential):
    """The seed notebook's CNN: conv 32 -> conv 64 -> fc 768 -> outputs.

    Each convolution is 3x3 with padding 1, followed by ReLU and 2x2 max pooling, so a
    ``[N, C, H, W]`` input becomes ``[N, 64, H // 4, W // 4]`` before the fully connected layers.

    Args:
        in_channels: channels of the input images (1 for MNIST).
        n_outputs: width of the output layer (logits).
        image_size: height and width of the (square) input images, e.g. 28 for MNIST, 8 for digits.
    """

    def __init__(self, in_channels: int = 1, n_outputs: int = 10, image_size: int = 28) -> None:
        side = image_size // 4
        super().__init__(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, 768),
            nn.ReLU(),
            nn.Linear(768, n_outputs),
        )


def build_model(
    name: str, input_shape: Sequence[int], n_outputs: int, hidden: Sequence[int] = (400, 400)
) -> nn.Module:
    """Build a reference model by name for per-sample inputs of ``input_shape`` (C, H, W)."""
    if name == "mlp":
        return MLP(math.prod(input_shape), n_outputs, hidden)
    if name == "cnn":
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ValueError(
                f"model 'cnn' needs square images of shape (C, H, H), got input_shape="
                f"{tuple(input_shape)}; use --model mlp for this benchmark"
            )
        return SimpleCNN(input_shape[0], n_outputs, input_shape[1])
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
