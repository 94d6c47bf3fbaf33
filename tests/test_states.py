"""One state check for both ends (lssfl.common.states): the coordinator's words for an upload
that cannot enter the aggregate, the silo's for a download that does not fit its model."""

import pytest
import torch

from lssfl.common.states import check_state, state_misfit
from lssfl.silo.task import TaskRefused, check_received

LIKE = {"a": torch.zeros(2, 3), "n": torch.tensor(0)}
CASES = [
    ({"a": torch.ones(2, 3), "n": torch.tensor(4)}, None),
    ({**LIKE, "b": torch.zeros(1)}, "unknown tensor 'b'"),
    ({"a": torch.zeros(2, 3)}, "missing tensor 'n'"),
    ({**LIKE, "a": torch.zeros(3, 2)}, "tensor 'a' has shape [3, 2], expected [2, 3]"),
    ({**LIKE, "a": torch.zeros(2, 3, dtype=torch.float64)}, "has dtype torch.float64"),
    ({**LIKE, "a": torch.full((2, 3), float("nan"))}, "tensor 'a' holds NaN or infinite"),
]


@pytest.mark.parametrize(("state", "reason"), CASES)
def test_check_state_names_the_first_misfit(state, reason):
    got = check_state(state, LIKE)
    assert (got is None) if reason is None else (reason in got)


def test_the_silo_refuses_a_misfit_in_its_own_words_and_takes_non_finite_values():
    model = torch.nn.Linear(3, 2)
    state = model.state_dict()
    check_received({k: v.clone() for k, v in state.items()}, model)
    with pytest.raises(TaskRefused, match=r"does not fit the task's architecture \(tensor 'x'\)"):
        check_received({**state, "x": torch.zeros(1)}, model)
    with pytest.raises(TaskRefused, match=r"received tensor 'bias' is torch.float64 \[2\], the "):
        check_received({**state, "bias": torch.zeros(2, dtype=torch.float64)}, model)
    nan = {**state, "bias": torch.full((2,), float("nan"))}
    assert state_misfit(nan, state, finite=False) is None  # the silo measures, then trains
    assert state_misfit(nan, state, finite=True).kind == "finite"
