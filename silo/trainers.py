"""Local trainers: what a silo does with the global model in one round.

Every trainer takes the model loaded with the weights received this round, trains it on the
silo's private tensors, and leaves in it the weights to upload. The coordinator never knows
which trainer ran: it only sees a state dict and a sample count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LocalTrainer(Protocol):
    def train(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int
    ) -> dict[str, float]:
        """Train ``model`` in place on (x, y); return metrics such as ``train_loss``.

        ``model``, ``x`` and ``y`` are already on the silo's device. All randomness must come
        from ``seed`` so that a round can be replayed bit for bit on CPU.
        """
        ...


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch; the last short batch is kept."""
    order = torch.randperm(n, generator=generator).to(device)
    yield from order.split(batch_size)


def make_optimizer(
    name: str, params: Any, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adam, sgd")


@dataclass
class FedAvgTrainer:
    """Plain local epochs of Adam or SGD (McMahan et al., 2017)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def train(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int
    ) -> dict[str, float]:
        generator = torch.Generator().manual_seed(seed)
        opt = make_optimizer(
            self.optimizer, model.parameters(), self.lr, self.momentum, self.weight_decay
        )
        model.train()
        total, seen = 0.0, 0
        for _ in range(self.epochs):
            for idx in batches(len(x), self.batch_size, generator, x.device):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                seen += len(idx)
        return {"train_loss": total / max(seen, 1)}


TRAINERS: dict[str, type] = {"fedavg": FedAvgTrainer}


def make_trainer(spec: dict[str, Any]) -> LocalTrainer:
    """Build from ``{"name": "fedavg", **hyper_parameters}``; ValueError names what is wrong."""
    params = dict(spec)
    name = params.pop("name", None)
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; known: {', '.join(sorted(TRAINERS))}")
    cls = TRAINERS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"trainer {name!r} has no parameter {unknown[0]!r}; known: {', '.join(sorted(known))}"
        )
    return cls(**params)
