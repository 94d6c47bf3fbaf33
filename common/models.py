"""Model architectures, built by name from a small JSON-able spec that travels with each task.

A name is one of the built-ins below, any torchvision classification model
(``mobilenet_v3_small``, ``efficientnet_b0`` ...; random weights) or a site's own builder by
import path (``my_pkg.models:build``, lssfl.common.plugins), called with the spec's kwargs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from lssfl.common.plugins import is_import_path, load_import_path


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
        """Logits for a batch of images."""
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
        """Logits for a batch of images."""
        return self.net(x)


def _resnet18(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=num_classes)


def _resnet50(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(num_classes=num_classes)


def head_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: the last ``nn.Linear`` in registration order, and its name.

    Registration order puts the classifier last in every model built here and in most of
    torchvision's classification models; a model of a site's own must register its classifier
    last for the features that treat the head apart (``exclude_head``, ``head_only``, the
    new head of ``model.init: pretrain``).
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to serve as its classifier head"
        )
    return linears[-1]


def check_head(model: nn.Module, num_classes: int | None) -> None:
    """ValueError unless the last ``nn.Linear`` looks like the classifier: it exists and, when
    ``num_classes`` is known, has that many outputs."""
    name, linear = head_linear(model)
    if num_classes is not None and linear.out_features != num_classes:
        raise ValueError(
            f"the last nn.Linear of {type(model).__name__} ({name or 'the model'}) has "
            f"{linear.out_features} outputs, not num_classes {num_classes}: register the "
            "classifier last to use a head-aware feature"
        )


def statistics_names(model: nn.Module) -> frozenset[str]:
    """The model's floating buffers (BatchNorm's running mean and variance): statistics, not
    weights, which both roles send exact under any codec (lssfl.common.wire.pack_state)."""
    return frozenset(n for n, b in model.named_buffers() if b.is_floating_point())


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the head's parameters, as in ``model.named_parameters()``."""
    prefix, module = head_linear(model)
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]


_BUILDERS = {"cnn": SmallCNN, "mlp": MLP, "resnet18": _resnet18, "resnet50": _resnet50}


@functools.cache
def torchvision_models() -> frozenset[str]:
    """The names of torchvision's classification models."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _torchvision_builder(name: str) -> Any:
    import torchvision

    def build(**kwargs: Any) -> nn.Module:
        # The built-ins' class count, not ImageNet's 1000; never downloaded weights.
        kwargs.setdefault("num_classes", 10)
        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build from ``{"name": ..., **kwargs}``; raises ValueError naming what is wrong.

    Import paths are imported here without question: callers that take the spec from a peer
    check it first (lssfl.common.plugins.check_allowed).
    """
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    if name in _BUILDERS:
        builder: Any = _BUILDERS[name]
    elif is_import_path(name):
        builder = load_import_path(name, "model")
    elif name in torchvision_models():
        builder = _torchvision_builder(name)
    else:
        raise ValueError(
            f"unknown model {name!r}; known: {', '.join(sorted(_BUILDERS))}, a torchvision "
            "classification model (e.g. mobilenet_v3_small) or an import path package.module:name"
        )
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for model {name!r}: {exc}") from None
    except Exception as exc:  # a site's builder may raise anything
        raise ValueError(f"model {name!r} failed to build: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model


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
