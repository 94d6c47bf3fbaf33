"""The batch loop every local trainer shares: shuffled index batches, optimizers, one step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lssfl.common.progress import progress


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch; the last short batch is kept."""
    order = torch.randperm(n, generator=generator).to(device)
    parts = order.split(batch_size)
    yield from progress(parts, len(parts), "train epoch", " batches")


OPTIMIZERS = ("adam", "sgd")


@dataclass
class LocalSteps:
    """The batch size and optimizer every local trainer shares, checked once here.

    Defaults are the paper's: Adam 5e-4, batch 64. A trainer dataclass inherits these
    fields (they come first in its spec) and calls ``super().__post_init__()``.
    """

    batch_size: int = 64
    lr: float = 5e-4
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: adam, sgd")

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """A fresh Adam or SGD over ``params`` with these settings."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


def local_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    after_backward: Callable[[], None] | None = None,
) -> float:
    """One optimizer step of plain local training on a batch; returns the batch's mean loss."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    opt.step()
    return loss.item()
