"""The aggregation rule (which silos train each round, how their models combine), the
sample-count weighted average it uses by default (FedAvg), and what a state must be to enter
an aggregate."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch

from lssfl.common.config import RunConfig
from lssfl.common.seeding import derive_seed


def weighted_average(
    states: Iterable[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    like: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Average ``states`` with ``weights`` into tensors shaped and typed like ``like``.

    Sums run in float64 in a fixed order, so the result does not depend on arrival order
    beyond the order of ``states``. ``states`` is read once, one state at a time: a generator
    that loads each from disk keeps memory at one model plus the sums, whatever their number.
    Integer buffers (BatchNorm's ``num_batches_tracked``) are averaged the same way and
    rounded: a counter of steps taken stays a plausible count.
    """
    if not weights:
        raise ValueError("need one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must add up to a positive number")
    acc = {name: torch.zeros(ref.shape, dtype=torch.float64) for name, ref in like.items()}
    try:
        for state, w in zip(states, weights, strict=True):
            for name, sum_ in acc.items():
                sum_.add_(state[name].to(torch.float64), alpha=w / total)
    except ValueError as exc:  # zip(strict=True): a state without its weight or the reverse
        raise ValueError(f"need one weight per state and at least one state ({exc})") from None
    out: dict[str, torch.Tensor] = {}
    for name, ref in like.items():
        sum_ = acc.pop(name)
        out[name] = sum_.to(ref.dtype) if ref.is_floating_point() else sum_.round().to(ref.dtype)
    return out


class AggregationRule(Protocol):
    """Which silos train each round and how their models make the next global model."""

    def select(self, alive: list[str], round_num: int) -> set[str]:
        """The silos asked to train in ``round_num``, out of the live ones (sorted)."""
        ...

    def aggregate(
        self,
        states: Iterable[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The next global model from the round's ``states`` (read once, in order),
        ``weights`` (sample counts) and ``base`` (the round's global model)."""
        ...


class WeightedMean:
    """FedAvg: every live silo, or ``silos_per_round`` + ``over_select`` of them drawn with
    the run's seed; models averaged by sample count."""

    def __init__(self, cfg: RunConfig) -> None:
        self.seed = cfg.run.seed
        self.silos_per_round = cfg.coordinator.silos_per_round
        self.over_select = cfg.coordinator.over_select

    def select(self, alive: list[str], round_num: int) -> set[str]:
        """Every live silo, or a seeded draw of k + m of them."""
        k = self.silos_per_round
        if k is None:
            return set(alive)
        rng = random.Random(derive_seed(self.seed, round_num, "selection"))
        return set(rng.sample(alive, min(len(alive), k + self.over_select)))

    def aggregate(
        self,
        states: Iterable[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The sample-count weighted average, shaped like ``base``."""
        return weighted_average(states, weights, base)


# coordinator.aggregation's names (lssfl.common.config.AGGREGATION_RULES lists the same).
RULES: dict[str, Callable[[RunConfig], AggregationRule]] = {"weighted_mean": WeightedMean}


def aggregation_rule(cfg: RunConfig) -> AggregationRule:
    """The rule ``coordinator.aggregation`` names (checked when the config was read)."""
    return RULES[cfg.coordinator.aggregation](cfg)
