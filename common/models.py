"""Model architectures, built by name from a small JSON-able spec that travels with each task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SmallCNN(nn.Module):
    """The default model: two conv blocks with BatchNorm, sized for 16x16 RGB digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """A plain multi-layer perceptron; large widths make big models for transport tests."""

    def __init__(
        self, num_classes: int = 10, in_features: int = 3 * 16 * 16, hidden: int = 128
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resnet18(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=num_classes)


def _resnet50(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(num_classes=num_classes)


def head_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: the last ``nn.Linear`` in registration order, and its name.

    Registration order puts the classifier last in every model built here and in
    torchvision's classification models.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to serve as its head")
    return linears[-1]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the head's parameters, as in ``model.named_parameters()``."""
    prefix, module = head_linear(model)
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]


_BUILDERS = {"cnn": SmallCNN, "mlp": MLP, "resnet18": _resnet18, "resnet50": _resnet50}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build from ``{"name": ..., **kwargs}``; raises ValueError naming what is wrong."""
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    try:
        return _BUILDERS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for model {name!r}: {exc}") from None


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on (x, y), in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    n = max(len(x), 1)
    return correct / n, loss / n
