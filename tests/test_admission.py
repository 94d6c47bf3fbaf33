"""The phase transitions and the upload admission checks, as plain functions."""

import pytest
import torch

from lssfl.server import admission
from lssfl.server.admission import Refusal, RefusalKind
from lssfl.server.phases import TRANSITIONS, Phase, PhaseError, advance

PRECONDITION, INVALID = RefusalKind.PRECONDITION, RefusalKind.INVALID


def test_a_run_goes_through_its_phases_in_order():
    phase = Phase.WAITING
    for to in (Phase.TRAIN, Phase.AGGREGATE, Phase.CLOSED, Phase.TRAIN, Phase.AGGREGATE):
        phase = advance(phase, to)
    # The last round, evaluated at the silos.
    for to in (Phase.EVALUATE, Phase.AGGREGATE, Phase.CLOSED, Phase.DONE):
        phase = advance(phase, to)
    assert phase is Phase.DONE
    assert advance(Phase.WAITING, Phase.DONE) is Phase.DONE  # resumed with nothing left


@pytest.mark.parametrize(
    "current, to",
    [(c, t) for c in Phase for t in Phase if t not in TRANSITIONS[c]],
)
def test_every_other_transition_raises(current, to):
    with pytest.raises(PhaseError, match=f"from phase '{current.value}' to '{to.value}'"):
        advance(current, to)


def test_the_stored_phase_strings_stay_as_they_were():
    assert [p.value for p in Phase] == [
        "waiting", "train", "aggregate", "evaluate", "closed", "done"
    ]  # fmt: skip


def test_identity_and_run():
    assert admission.check_identity("s1", enrolled=True, joined=True) is None
    assert admission.check_identity("x", enrolled=False, joined=False) == Refusal(
        RefusalKind.PERMISSION, "unknown silo 'x'"
    )
    assert admission.check_identity("s1", enrolled=True, joined=False) == Refusal(
        PRECONDITION, "silo 's1' must join first"
    )
    assert admission.check_run("", "r1") is None and admission.check_run("r1", "r1") is None
    assert admission.check_run("r0", "r1") == Refusal(
        PRECONDITION, "run 'r0' is not the current run 'r1': join again"
    )


def test_join_bounds_and_data_that_does_not_fit():
    spec = ((3, 8, 8), 10)
    assert admission.check_join(5, 10, [3, 8, 8], 10, spec) is None
    assert admission.check_join(5, 10, [], 0, spec) is None  # not declared: not checked
    assert admission.check_join(11, 10, [], 0, None) == Refusal(
        INVALID, "num_samples 11 is not in [1, 10] (max_num_samples)"
    )
    assert admission.check_join(5, 10, [1, 8, 8], 10, spec) == Refusal(
        INVALID, "data samples have shape [1, 8, 8], the model takes [3, 8, 8]"
    )
    assert admission.check_join(5, 10, [3, 8, 8], 100, spec) == Refusal(
        INVALID, "data has 100 classes, the model predicts 10"
    )


def test_result_rounds_open_late_not_yet_open_and_not_selected():
    check = admission.check_result_round
    assert check("s1", 2, 2, Phase.TRAIN, selected=True) is None
    assert check("s1", 2, 2, Phase.TRAIN, selected=False) == Refusal(
        PRECONDITION, "silo 's1' was not selected for round 2"
    )
    assert check("s1", 3, 2, Phase.TRAIN, selected=True) == Refusal(
        PRECONDITION, "round 3 is not open (current round 2, train)"
    )
    # Closed, its record still to come: late, counted there.
    assert check("s1", 2, 2, Phase.AGGREGATE, selected=True) == Refusal(
        PRECONDITION, "round 2 is closed (current round 2, aggregate)", late=True
    )
    # Committed, or an older round: refused, counted nowhere.
    assert check("s1", 2, 2, Phase.CLOSED, selected=True).late is False
    assert check("s1", 1, 2, Phase.TRAIN, selected=True).late is False
    assert admission.check_download(2, 2, Phase.EVALUATE) is None
    assert admission.check_download(1, 2, Phase.TRAIN).kind is PRECONDITION
    assert admission.check_evaluation_round(2, 2, Phase.EVALUATE, selected=True) is None
    assert (
        admission.check_evaluation_round(2, 2, Phase.EVALUATE, selected=False).kind is PRECONDITION
    )


def test_state_weight_metrics_and_norm():
    like = {"w": torch.zeros(2), "n": torch.tensor(1)}
    assert admission.check_upload_state({"w": torch.ones(2), "n": torch.tensor(3)}, like) is None
    assert admission.check_upload_state({"w": torch.ones(3), "n": torch.tensor(3)}, like) == (
        Refusal(INVALID, "tensor 'w' has shape [3], expected [2]")
    )
    assert admission.check_weight(10, 10, {"loss": 0.5}) is None
    assert admission.check_weight(11, 10, {}) == Refusal(
        INVALID, "num_samples 11 is not in [1, 10] (declared at Join)"
    )
    assert admission.check_weight(5, 10, {"seconds": 1.0}) == Refusal(
        INVALID, "metric 'seconds' would overwrite the record's train_seconds"
    )
    assert admission.check_weight(5, 10, {"loss": float("nan")}).kind is INVALID
    assert admission.metric_clash(["train_loss", "loss"]) is None
    moved = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(9)}
    assert admission.update_norm(moved, like) == 5.0  # integer buffers do not count
    assert admission.check_update_norm(moved, like, None) is None
    assert admission.check_update_norm(moved, like, 5.0) is None
    assert admission.check_update_norm(moved, like, 4.0) == Refusal(
        INVALID, "update norm 5 exceeds coordinator.max_update_norm 4"
    )


def test_evaluation_bounds():
    assert admission.check_evaluation(0.5, 0.9, 10, declared=10) is None
    assert admission.check_evaluation(float("inf"), 0.9, 10, 10) == Refusal(
        INVALID, "evaluation loss must be a finite number >= 0, got inf"
    )
    assert admission.check_evaluation(0.5, float("nan"), 10, 10) == Refusal(
        INVALID, "evaluation accuracy must be in [0, 1], got nan"
    )
    assert admission.check_evaluation(0.5, 0.9, 11, 10) == Refusal(
        INVALID, "evaluation num_samples must be in [1, 10] (declared at join), got 11"
    )
