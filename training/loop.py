"""The batch loop every local trainer shares: shuffled index batches, optimizers, one step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def make_optimizer(
    name: str, params: Any, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Adam or SGD over ``params``; ValueError for another name."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adam, sgd")


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
