"""The coordinator's phases and the one function that moves between them.

A run goes WAITING -> TRAIN -> AGGREGATE -> CLOSED -> TRAIN ... and ends in DONE; after the
last round with evaluation at the silos, AGGREGATE -> EVALUATE -> AGGREGATE before CLOSED.
The phases' values are the strings the store keeps and ``lssfl status`` reads.
"""

from __future__ import annotations

from enum import Enum


class Phase(Enum):
    """Where the coordinator's round state machine stands."""

    WAITING = "waiting"  # before the first round of this process: silos join
    TRAIN = "train"  # a round is open: selected silos download, train and upload
    AGGREGATE = "aggregate"  # the round is closed to uploads; late ones count in its record
    EVALUATE = "evaluate"  # after the last round: silos measure the final model
    CLOSED = "closed"  # the round is committed; the next one has not opened
    DONE = "done"  # every round is committed: silos are told to exit


# Where each phase may go next.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.WAITING: frozenset({Phase.TRAIN, Phase.DONE}),
    Phase.TRAIN: frozenset({Phase.AGGREGATE}),
    Phase.AGGREGATE: frozenset({Phase.EVALUATE, Phase.CLOSED}),
    Phase.EVALUATE: frozenset({Phase.AGGREGATE}),
    Phase.CLOSED: frozenset({Phase.TRAIN, Phase.DONE}),
    Phase.DONE: frozenset(),
}


class PhaseError(RuntimeError):
    """A transition the state machine does not allow: a bug, never a peer's doing."""


def advance(current: Phase, to: Phase) -> Phase:
    """``to``, when the machine may go there from ``current``; PhaseError otherwise."""
    if to not in TRANSITIONS[current]:
        raise PhaseError(f"no transition from phase {current.value!r} to {to.value!r}")
    return to
