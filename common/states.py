"""What a state dict must be to stand for a given model: the same tensors, shapes, dtypes.

One check for both ends: the coordinator refuses an upload that cannot enter the aggregate
(``check_state``), a silo refuses a download that does not fit the task's architecture
(``state_misfit`` with its own wording).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Misfit:
    """The first way a state differs from the one it should look like.

    ``kind``: "unknown" (a tensor ``like`` lacks), "missing", "shape", "dtype" or "finite"
    (NaN or infinite values); ``got``/``expected``: the two tensors, where both exist.
    """

    kind: str
    name: str
    got: torch.Tensor | None = None
    expected: torch.Tensor | None = None


def state_misfit(
    state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor], *, finite: bool
) -> Misfit | None:
    """How ``state`` differs from ``like`` (names first, then each tensor in ``like``'s
    order), or None when it has exactly its tensors, shapes and dtypes (and, with
    ``finite``, only finite floating values)."""
    unknown = sorted(set(state) - set(like))
    if unknown:
        return Misfit("unknown", unknown[0])
    absent = sorted(set(like) - set(state))
    if absent:
        return Misfit("missing", absent[0])
    for name, ref in like.items():
        t = state[name]
        if t.shape != ref.shape:
            return Misfit("shape", name, t, ref)
        if t.dtype != ref.dtype:
            return Misfit("dtype", name, t, ref)
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return Misfit("finite", name, t, ref)
    return None


def check_state(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot enter an aggregate with ``like``, or None if it can."""
    misfit = state_misfit(state, like, finite=True)
    if misfit is None:
        return None
    name, got, expected = misfit.name, misfit.got, misfit.expected
    if misfit.kind in ("unknown", "missing") or got is None or expected is None:
        return f"{misfit.kind} tensor {name!r}"
    if misfit.kind == "shape":
        return f"tensor {name!r} has shape {list(got.shape)}, expected {list(expected.shape)}"
    if misfit.kind == "dtype":
        return f"tensor {name!r} has dtype {got.dtype}, expected {expected.dtype}"
    return f"tensor {name!r} holds NaN or infinite values"
