import numpy as np
import pytest
import torch

from lssfl.server.aggregate import weighted_average


def test_weighted_average_matches_numpy_float64():
    g = torch.Generator().manual_seed(0)
    states = [
        {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)
    ]
    weights = [10, 30, 60]
    out = weighted_average(states, weights, states[0])
    for k in ("w", "b"):
        expected = (
            sum(w * s[k].double().numpy() for s, w in zip(states, weights, strict=True)) / 100
        )
        np.testing.assert_allclose(out[k].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert out[k].dtype == torch.float32


def test_integer_buffers_stay_integers_and_round():
    states = [{"n": torch.tensor(10)}, {"n": torch.tensor(13)}]
    out = weighted_average(states, [1, 1], states[0])
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 12  # 11.5 rounds to even


def test_weights_are_validated():
    with pytest.raises(ValueError):
        weighted_average([], [], {})
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.ones(1)}], [0], {"a": torch.ones(1)})
