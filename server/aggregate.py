"""Sample-count weighted averaging of state dicts (FedAvg aggregation), and what a state
must be to enter one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch


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


def check_state(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot enter an aggregate with ``like``, or None if it can."""
    unknown = sorted(set(state) - set(like))
    if unknown:
        return f"unknown tensor {unknown[0]!r}"
    absent = sorted(set(like) - set(state))
    if absent:
        return f"missing tensor {absent[0]!r}"
    for name, ref in like.items():
        t = state[name]
        if t.shape != ref.shape:
            return f"tensor {name!r} has shape {list(t.shape)}, expected {list(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"tensor {name!r} has dtype {t.dtype}, expected {ref.dtype}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"tensor {name!r} holds NaN or infinite values"
    return None
