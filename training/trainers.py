"""Local trainers: what a silo does with the global model in one round.

Every trainer takes the model loaded with the weights received this round, trains it on the
silo's private tensors, and leaves in it the weights to upload. The coordinator never knows
which trainer ran: it only sees a state dict and a sample count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lssfl.common.models import head_parameter_names
from lssfl.common.plugins import is_import_path, load_import_path
from lssfl.training.loop import LocalSteps, batches, local_step
from lssfl.training.lss import LSSTrainer, PaperLSSTrainer


@runtime_checkable
class LocalTrainer(Protocol):
    """What a silo runs each round: any object with this ``train`` method.

    A site plugs in its own with ``trainer: {name: "my_pkg.train:MyTrainer", ...}``: the
    silo calls ``MyTrainer(**hyper_parameters)`` (the section's other keys) once per round,
    then ``train``. When the class is a dataclass its fields' types are checked like any
    other config key. A silo imports the class only if started with ``--allow-plugin
    my_pkg.train:MyTrainer``; ``lssfl run`` passes that for the config's own names.
    """

    def train(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int
    ) -> dict[str, float]:
        """Train ``model`` in place on (x, y); return metrics such as ``train_loss``.

        Receives the global model of the round, already loaded with the received weights, and
        the silo's private samples ``x`` (float images, N x C x H x W) with int64 labels ``y``;
        all three are already on the silo's device. What ``model`` holds on return is
        uploaded: its state dict, every key and shape unchanged.

        All randomness must come from ``seed`` (e.g. ``torch.Generator().manual_seed(seed)``)
        so that a round can be replayed bit for bit on CPU; the silo also seeds torch's
        global generator with it before the call.

        The returned metrics (name -> float; ``train_loss`` by convention) are sent to the
        coordinator with the upload and recorded per silo as ``train_<name>`` in
        metrics.jsonl; keep them few and finite.
        """
        ...


def _local_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    after_backward: Callable[[], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """The loop every FedAvg-style trainer shares; the hooks add what makes each one different."""
    generator = torch.Generator().manual_seed(seed)
    total, seen = 0.0, 0
    for epoch in range(epochs):
        for idx in batches(len(x), batch_size, generator, x.device):
            total += local_step(model, opt, x[idx], y[idx], after_backward) * len(idx)
            seen += len(idx)
        if after_epoch is not None:
            after_epoch(epoch)
    return {"train_loss": total / max(seen, 1)}


@contextmanager
def _trainable(model: nn.Module, head_only: bool) -> Iterator[list[nn.Parameter]]:
    """The parameters to train, with the model in the matching mode.

    ``head_only`` is a linear probe: every parameter but the last ``nn.Linear``'s is frozen
    and the model runs in eval mode, so BatchNorm keeps its running statistics too.
    """
    if not head_only:
        model.train()
        yield [p for p in model.parameters() if p.requires_grad]
        return
    head = set(head_parameter_names(model))
    frozen = [p for n, p in model.named_parameters() if n not in head and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    try:
        yield [p for n, p in model.named_parameters() if n in head]
    finally:
        for p in frozen:
            p.requires_grad_(True)


@dataclass
class FedAvgTrainer(LocalSteps):
    """Plain local epochs of Adam or SGD (McMahan et al., 2017).

    Defaults are the paper's FedAvg baseline for LSS: 8 epochs of Adam 5e-4, batch 64.
    ``head_only`` trains the classifier (last ``nn.Linear``) alone on a frozen backbone: the
    control that shows how much of a gain comes from keeping the backbone at its start.
    """

    epochs: int = 8
    head_only: bool = False

    def train(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int
    ) -> dict[str, float]:
        """Train ``epochs`` local epochs in place; returns the mean loss (``train_loss``)."""
        return self._train(model, x, y, seed)

    def _train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        seed: int,
        after_backward: Callable[[list[nn.Parameter]], Callable[[], None]] | None = None,
        after_epoch: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """The shared body: trainable parameters, optimizer, epochs; the hooks specialise it."""
        with _trainable(model, self.head_only) as params:
            opt = self.make_optimizer(params)
            return _local_epochs(
                model,
                opt,
                x,
                y,
                epochs=self.epochs,
                batch_size=self.batch_size,
                seed=seed,
                after_backward=None if after_backward is None else after_backward(params),
                after_epoch=after_epoch,
            )


@dataclass
class FedProxTrainer(FedAvgTrainer):
    """FedAvg plus a proximal term (mu/2) ||w - w_global||^2 (Li et al., 2020).

    The term's gradient, mu (w - w_global), is added to the gradients by hand, so no graph is
    built for it. ``train_loss`` is the cross-entropy alone. mu = 0 is FedAvg, bit for bit.
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mu < 0:
            raise ValueError(f"fedprox: mu must be >= 0, got {self.mu}")

    def train(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int
    ) -> dict[str, float]:
        """FedAvg's epochs with the proximal gradient added after every backward pass."""

        def proximal(params: list[nn.Parameter]) -> Callable[[], None]:
            received = [p.detach().clone() for p in params]

            @torch.no_grad()
            def add_term() -> None:
                for p, w in zip(params, received, strict=True):
                    if p.grad is not None:
                        p.grad.add_(p - w, alpha=self.mu)

            return add_term

        return self._train(model, x, y, seed, after_backward=proximal if self.mu else None)


@dataclass
class SWATrainer(FedAvgTrainer):
    """Local stochastic weight averaging (Izmailov et al., 2018).

    Plain local epochs; the upload is the uniform average of the weights at the end of every
    epoch after the first ``swa_start`` (swa_start = epochs - 1 is FedAvg). The learning rate
    is not changed. BatchNorm running statistics are those of the last step, not recomputed
    for the averaged weights (that would cost another pass over the data).
    """

    swa_start: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.swa_start < self.epochs:
            raise ValueError(
                f"swa: swa_start must be in [0, epochs), got {self.swa_start} with "
                f"epochs={self.epochs}"
            )

    def train(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int
    ) -> dict[str, float]:
        """FedAvg's epochs; leaves the average of the end-of-epoch weights in ``model``."""
        params = list(model.parameters())
        average = [torch.empty_like(p) for p in params]
        count = 0

        @torch.no_grad()
        def accumulate(epoch: int) -> None:
            nonlocal count
            if epoch < self.swa_start:
                return
            count += 1
            for a, p in zip(average, params, strict=True):
                if count == 1:
                    a.copy_(p)
                else:  # running mean, as torch.optim.swa_utils does
                    a.add_(p - a, alpha=1.0 / count)

        metrics = self._train(model, x, y, seed, after_epoch=accumulate)
        with torch.no_grad():
            for p, a in zip(params, average, strict=True):
                p.copy_(a)
        return metrics


TRAINERS: dict[str, type] = {
    "fedavg": FedAvgTrainer,
    "fedprox": FedProxTrainer,
    "swa": SWATrainer,
    "lss": LSSTrainer,
    "lss-paper": PaperLSSTrainer,
}


def trainer_class(name: Any) -> Any:
    """The class (or factory) a trainer name stands for: a built-in or an import path;
    ValueError naming what is wrong."""
    if isinstance(name, str) and is_import_path(name):
        return load_import_path(name, "trainer")
    if name not in TRAINERS:
        raise ValueError(
            f"unknown trainer {name!r}; known: {', '.join(sorted(TRAINERS))} or an import path "
            "package.module:Class"
        )
    return TRAINERS[name]


def make_trainer(spec: dict[str, Any]) -> LocalTrainer:
    """Build from ``{"name": "fedavg", **hyper_parameters}``; ValueError names what is wrong."""
    params = dict(spec)
    name = params.pop("name", None)
    cls = trainer_class(name)
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"trainer {name!r} has no parameter {unknown[0]!r}; "
                f"known: {', '.join(sorted(known))}"
            )
    try:
        trainer = cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad arguments for trainer {name!r}: {exc}") from None
    except ValueError:
        raise
    except Exception as exc:  # a site's trainer may raise anything
        raise ValueError(f"trainer {name!r} failed to start: {type(exc).__name__}: {exc}") from None
    if not isinstance(trainer, LocalTrainer):
        raise ValueError(
            f"trainer {name!r} made a {type(trainer).__name__}, which has no train() method"
        )
    return trainer
