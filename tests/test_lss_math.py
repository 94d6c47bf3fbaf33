"""Tests for the pure pieces of Local Superior Soups (lssfl.training.lss and its distances):
the simplex draws, the pool's rows, the distances and the regulariser's closed-form gradient."""

from __future__ import annotations

import math

import pytest
import torch

from lssfl.training.lss import (
    FlatLayout,
    Pool,
    interpolate,
    sample_alphas,
)
from lssfl.training.lss_distances import (
    diversity_term,
    pairwise_sq_distances,
    regulariser,
    simplex_sq_volume,
    sq_distances,
)

torch.set_num_threads(1)


def test_sample_alphas_on_the_simplex() -> None:
    for k in (2, 3, 5):
        a = sample_alphas(k, 3, torch.Generator().manual_seed(1))
        assert a.shape == (3, k) and a.dtype == torch.float64
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(dim=1), torch.ones(3, dtype=torch.float64))
    same = sample_alphas(4, 2, torch.Generator().manual_seed(1))
    assert torch.equal(same, sample_alphas(4, 2, torch.Generator().manual_seed(1)))
    assert not torch.equal(same, sample_alphas(4, 2, torch.Generator().manual_seed(2)))
    # Dirichlet(1,...,1): each weight has mean 1/k
    many = sample_alphas(4, 4000, torch.Generator().manual_seed(3))
    assert (many.mean(dim=0) - 0.25).abs().max() < 0.02


def test_one_member_draws_nothing() -> None:
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    assert torch.equal(sample_alphas(1, 3, g), torch.ones(1, 1, dtype=torch.float64))
    assert torch.equal(g.get_state(), before)


def test_interpolate() -> None:
    members = torch.randn(4, 10, dtype=torch.float64)
    alpha = sample_alphas(4, 1, torch.Generator().manual_seed(0))[0]
    out = torch.empty(10, dtype=torch.float64)
    interpolate(members, alpha, out)
    torch.testing.assert_close(out, alpha @ members)
    interpolate(members[:1], torch.ones(1, dtype=torch.float64), out)
    assert torch.equal(out, members[0])


def _pool(capacity: int = 3) -> Pool:
    layout = FlatLayout(("w", "b"), (torch.Size([2, 3]), torch.Size([3])))
    pool = Pool(layout, capacity, torch.zeros(1))
    pool.anchor.copy_(torch.arange(9.0))
    return pool


def test_pool_members_start_at_the_pool_average() -> None:
    pool = _pool()
    params = pool.start_member()
    assert torch.equal(pool.active, pool.anchor)  # member 1 starts at f_p
    assert [p.shape for p in params] == [torch.Size([2, 3]), torch.Size([3])]
    assert all(p.is_leaf and p.requires_grad for p in params)
    params[1].grad.fill_(7.0)  # gradients are views of the flat buffer
    assert torch.equal(pool.grad[6:], torch.full((3,), 7.0))
    with torch.no_grad():
        params[0].add_(1.0)  # trains in place in its row
    assert torch.equal(pool.rows[1, :6], torch.arange(6.0) + 1)
    pool.finish_member()
    assert not params[0].requires_grad and params[0].grad is None
    pool.start_member()
    with torch.no_grad():
        pool.active.add_(torch.randn(9))
    pool.finish_member()
    pool.start_member()
    torch.testing.assert_close(pool.active, pool.rows[1:3].mean(dim=0))
    pool.finish_member()
    with pytest.raises(RuntimeError):
        pool.start_member()
    torch.testing.assert_close(pool.average(), pool.rows[1:].mean(dim=0))


def test_simplex_volume() -> None:
    def sq(points: torch.Tensor) -> torch.Tensor:
        return torch.cdist(points, points).square()

    seg = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(simplex_sq_volume(sq(seg)).sqrt(), torch.tensor(5.0).double())
    tri = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(simplex_sq_volume(sq(tri)).sqrt(), torch.tensor(6.0).double())
    tet = torch.cat([torch.zeros(1, 3), torch.eye(3)]).double()
    torch.testing.assert_close(simplex_sq_volume(sq(tet)).sqrt(), torch.tensor(1 / 6).double())


@pytest.mark.parametrize("rms", [False, True])
def test_distances_are_l2_or_rms_and_weighted(rms: bool) -> None:
    a = torch.randn(20, dtype=torch.float64)
    points = torch.randn(3, 20, dtype=torch.float64)
    w = torch.rand(20, dtype=torch.float64) + 0.5
    scratch = torch.empty(20, dtype=torch.float64)
    sq = ((a - points) * w).square()
    expected = sq.mean(dim=1) if rms else sq.sum(dim=1)  # the paper's L2 by default
    torch.testing.assert_close(sq_distances(a, points, w, scratch, rms), expected)
    # the triangle (0,0), (3,0), (0,4): area 6 and mean distance 3.5 from vertex 0 in L2;
    # RMS distances in R^2 are L2 / sqrt(2), so the area halves
    tri = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    s = sq_distances(tri[0], tri[1:], None, torch.empty(2, dtype=torch.float64), rms)
    frozen = sq_distances(tri[1], tri[2:], None, torch.empty(2, dtype=torch.float64), rms)
    frozen_sq = torch.tensor([[0.0, float(frozen[0])], [float(frozen[0]), 0.0]]).double()
    value, _ = diversity_term(s, frozen_sq, "volume")
    assert value == pytest.approx(3.0 if rms else 6.0)
    value, _ = diversity_term(s, frozen_sq, "l2")
    assert value == pytest.approx((3 + 4) / 2 / (math.sqrt(2) if rms else 1.0))


def _regularise(
    rows: torch.Tensor, weight: torch.Tensor | None, rms: bool = False, **kw
) -> tuple[float, torch.Tensor]:
    d = rows.shape[1]
    scratch = torch.empty(d, dtype=rows.dtype)
    frozen_sq = pairwise_sq_distances(rows[1:-1], weight, scratch, rms)
    grad = torch.zeros(d, dtype=rows.dtype)
    value, _ = regulariser(
        rows,
        frozen_sq,
        weight=weight,
        weight_sq=None if weight is None else weight * weight,
        grad=grad,
        scratch=scratch,
        rms=rms,
        **kw,
    )
    return value, grad


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("affinity", ["l2", "sq_l2"])
@pytest.mark.parametrize("diversity", ["l2", "volume"])
@pytest.mark.parametrize("importance", [False, True])
@pytest.mark.parametrize("lambdas", [(1.3, 0.7), (0.0, 0.9), (1.1, 0.0)])
@pytest.mark.parametrize("rms", [False, True])
def test_regulariser_gradient_matches_finite_differences(
    k: int,
    affinity: str,
    diversity: str,
    importance: bool,
    lambdas: tuple[float, float],
    rms: bool,
) -> None:
    g = torch.Generator().manual_seed(k)
    d = 12
    rows = torch.randn(k + 1, d, generator=g, dtype=torch.float64)
    weight = torch.rand(d, generator=g, dtype=torch.float64) + 0.5 if importance else None
    kw = dict(
        lambda_a=lambdas[0], lambda_d=lambdas[1], affinity=affinity, diversity=diversity, rms=rms
    )
    _, grad = _regularise(rows, weight, **kw)
    h = 1e-6
    numeric = torch.empty(d, dtype=torch.float64)
    for j in range(d):
        up, down = rows.clone(), rows.clone()
        up[-1, j] += h
        down[-1, j] -= h
        numeric[j] = _regularise(up, weight, **kw)[0] - _regularise(down, weight, **kw)[0]
    numeric /= 2 * h
    if lambdas == (0.0, 0.9) and k == 1:
        assert grad.abs().max() == 0  # nothing to regularise
    else:
        assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


def test_zero_distances_give_finite_zero_gradients() -> None:
    f1 = torch.randn(8, dtype=torch.float64)
    f2 = torch.randn(8, dtype=torch.float64)
    # member 2 starts as a copy of member 1 (and member 1 as a copy of f_p): distance 0
    for diversity in ("l2", "volume"):
        _, grad = _regularise(
            torch.stack([f1, f1, f1]), None, lambda_a=1.0, lambda_d=1.0, affinity="l2",
            diversity=diversity,
        )  # fmt: skip
        assert torch.equal(grad, torch.zeros(8, dtype=torch.float64))
    # member 3 starts at the midpoint of members 1 and 2: a flat simplex, finite gradient
    rows = torch.stack([f1, f1, f2, (f1 + f2) / 2])
    _, grad = _regularise(rows, None, lambda_a=0.0, lambda_d=1.0, affinity="l2", diversity="volume")
    assert torch.isfinite(grad).all()
