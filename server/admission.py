"""What the coordinator admits from a silo, as pure functions of plain values.

Each check returns a ``Refusal`` (its kind and the message the silo reads) or None when the
call may go on. Nothing here knows gRPC: the service maps a refusal's kind to a status code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import torch

from lssfl.common.peertext import check_metrics, peer_text
from lssfl.common.records import SiloRound
from lssfl.common.states import check_state
from lssfl.server.phases import Phase

# One sample's shape (as the test data's) and the number of classes (0: unknown).
DataSpec = tuple[tuple[int, ...], int]


class RefusalKind(Enum):
    """Why a call is refused, in the coordinator's terms."""

    PERMISSION = "permission"  # the caller is not an enrolled silo
    PRECONDITION = "precondition"  # not now: join first, another run, a round not open
    INVALID = "invalid"  # what the silo sent is wrong


@dataclass(frozen=True)
class Refusal:
    """A refused call: its kind, the message the silo reads, and for a result refused
    because its round has closed whether it counts as late in that round's record."""

    kind: RefusalKind
    message: str
    late: bool = False


class Refused(Exception):
    """Raised by the state machine with the refusal it answers a call with."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def check_identity(silo_id: str, enrolled: bool, joined: bool) -> Refusal | None:
    """An unknown silo, or one that has not joined yet."""
    if joined:
        return None
    name = peer_text(silo_id)
    if not enrolled:
        return Refusal(RefusalKind.PERMISSION, f"unknown silo {name!r}")
    return Refusal(RefusalKind.PRECONDITION, f"silo {name!r} must join first")


def check_run(run_id: str, current: str) -> Refusal | None:
    """A call for another run than the current one (an empty id names none)."""
    if run_id and run_id != current:
        return Refusal(
            RefusalKind.PRECONDITION,
            f"run {run_id!r} is not the current run {current!r}: join again",
        )
    return None


def check_join(
    num_samples: int,
    max_num_samples: int,
    sample_shape: Iterable[int],
    num_classes: int,
    data_spec: DataSpec | None,
) -> Refusal | None:
    """A sample count out of bounds, or data that does not fit the model."""
    problem = None
    shape = tuple(sample_shape)
    if not 1 <= num_samples <= max_num_samples:
        problem = f"num_samples {num_samples} is not in [1, {max_num_samples}] (max_num_samples)"
    elif data_spec is not None:
        model_shape, classes = data_spec
        if shape and shape != model_shape:
            problem = (
                f"data samples have shape {list(shape)[:9]}, the model takes {list(model_shape)}"
            )
        elif classes and num_classes and num_classes != classes:
            problem = f"data has {num_classes} classes, the model predicts {classes}"
    return None if problem is None else Refusal(RefusalKind.INVALID, problem)


def check_download(round_num: int, current: int, phase: Phase) -> Refusal | None:
    """A download of a round that is not open (for training or evaluation)."""
    if phase in (Phase.TRAIN, Phase.EVALUATE) and round_num == current:
        return None
    return Refusal(
        RefusalKind.PRECONDITION,
        f"round {round_num} is not open for download (current round {current})",
    )


def check_result_round(
    silo: str, round_num: int, current: int, phase: Phase, selected: bool
) -> Refusal | None:
    """A result for a round that is not open, or from a silo not selected for it. A result
    for the round just closed, whose record is still to come, is refused as late."""
    if round_num == current and phase is Phase.TRAIN:
        if not selected:
            return Refusal(
                RefusalKind.PRECONDITION, f"silo {silo!r} was not selected for round {round_num}"
            )
        return None
    if round_num > current:
        return Refusal(
            RefusalKind.PRECONDITION,
            f"round {round_num} is not open (current round {current}, {phase.value})",
        )
    return Refusal(
        RefusalKind.PRECONDITION,
        f"round {round_num} is closed (current round {current}, {phase.value})",
        late=round_num == current and phase is Phase.AGGREGATE,
    )


def check_evaluation_round(
    round_num: int, current: int, phase: Phase, selected: bool
) -> Refusal | None:
    """An evaluation report when no evaluation of its round is open to the silo."""
    if phase is Phase.EVALUATE and round_num == current and selected:
        return None
    return Refusal(
        RefusalKind.PRECONDITION,
        f"no evaluation of round {round_num} is open (current round {current}, {phase.value})",
    )


def check_upload_state(
    state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]
) -> Refusal | None:
    """A model that cannot enter an aggregate with ``like``."""
    problem = check_state(state, like)
    return None if problem is None else Refusal(RefusalKind.INVALID, problem)


def metric_clash(metrics: Iterable[str]) -> str | None:
    """A metric whose record key (``train_<name>``) is one of the record's own fields."""
    fields = {f.name for f in dataclasses.fields(SiloRound)}
    for name in metrics:
        key = name if name.startswith("train_") else f"train_{name}"
        if key in fields:
            return f"metric {name!r} would overwrite the record's {key}"
    return None


def check_weight(num_samples: int, declared: int, metrics: Mapping[str, float]) -> Refusal | None:
    """An upload that weighs more than its silo declared, or carries metrics that cannot be
    stored."""
    problem: str | None
    if not 1 <= num_samples <= declared:
        problem = f"num_samples {num_samples} is not in [1, {declared}] (declared at Join)"
    else:
        problem = check_metrics(metrics) or metric_clash(metrics)
    return None if problem is None else Refusal(RefusalKind.INVALID, problem)


def update_norm(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``state - base`` over the floating-point tensors, summed in float64."""
    total = 0.0
    for name, ref in base.items():
        if ref.is_floating_point():
            diff = state[name].to(torch.float64) - ref.to(torch.float64)
            total += float(torch.sum(diff * diff))
    return total**0.5


def check_update_norm(
    state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], bound: float | None
) -> Refusal | None:
    """An upload that moves the model further than ``bound`` (None: no bound)."""
    if bound is None:
        return None
    norm = update_norm(state, base)
    if norm <= bound:
        return None
    return Refusal(
        RefusalKind.INVALID,
        f"update norm {norm:.4g} exceeds coordinator.max_update_norm {bound:g}",
    )


def check_evaluation(
    loss: float, accuracy: float, num_samples: int, declared: int
) -> Refusal | None:
    """A silo's evaluation out of bounds: finite loss >= 0, accuracy in [0, 1], at least one
    and at most as many samples as the silo declared when it joined."""
    problem = None
    if not (math.isfinite(loss) and loss >= 0):
        problem = f"evaluation loss must be a finite number >= 0, got {loss!r}"
    elif not 0.0 <= accuracy <= 1.0:  # False for NaN too
        problem = f"evaluation accuracy must be in [0, 1], got {accuracy!r}"
    elif not 1 <= num_samples <= declared:
        problem = (
            f"evaluation num_samples must be in [1, {declared}] (declared at join), "
            f"got {num_samples}"
        )
    return None if problem is None else Refusal(RefusalKind.INVALID, problem)
