"""LSS's regulariser: the distances between pool members, the affinity and diversity terms,
and their closed-form gradient on the active member (``docs/lss.md``; the trainer is
``lssfl.training.lss``). Plain functions of flat float tensors: one row per model.

Distances are the paper's L2 distances ||w * (a - b)||_2 (w = 1 unless importance weights
are on), or divided by sqrt(D) with ``rms``. Where a distance (or the volume) is 0 its
gradient is taken as 0, the subgradient at the kink.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

AFFINITIES = ("l2", "sq_l2")
DIVERSITIES = ("l2", "volume")


@torch.no_grad()
def sq_distances(
    a: Tensor, points: Tensor, weight: Tensor | None, scratch: Tensor, rms: bool = False
) -> Tensor:
    """Squared distances ||w * (a - p)||^2 (/ D if ``rms``) to each row p: float64, CPU."""
    sq = []
    for p in points:
        torch.sub(a, p, out=scratch)
        if weight is not None:
            scratch.mul_(weight)
        sq.append(torch.dot(scratch, scratch))
    if not sq:
        return torch.zeros(0, dtype=torch.float64)
    out = torch.stack(sq).double().cpu()
    return out / a.numel() if rms else out


def pairwise_sq_distances(
    points: Tensor, weight: Tensor | None, scratch: Tensor, rms: bool = False
) -> Tensor:
    """(m, m) squared distances among the rows of ``points``: float64, CPU."""
    if len(points) == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    return torch.stack([sq_distances(p, points, weight, scratch, rms) for p in points])


def simplex_sq_volume(sq_dists: Tensor) -> Tensor:
    """Squared volume of the simplex whose vertices have pairwise squared distances ``sq_dists``.

    Cayley-Menger: for n vertices, V^2 = (-1)^n det(CM) / (2^(n-1) ((n-1)!)^2), where CM is
    ``sq_dists`` bordered by a row and a column of ones with a zero corner.
    """
    n = sq_dists.shape[0]
    corner = torch.zeros(n + 1, n + 1, dtype=sq_dists.dtype)
    corner[0, 0] = 1.0
    cm = F.pad(sq_dists, (1, 0, 1, 0), value=1.0) - corner
    return (-1) ** n * torch.linalg.det(cm) / (2 ** (n - 1) * math.factorial(n - 1) ** 2)


def affinity_term(sq_dist: float, kind: str) -> tuple[float, float]:
    """(value, d value / d sq_dist) of the distance to f_p."""
    if kind == "sq_l2":
        return sq_dist, 1.0
    d = math.sqrt(sq_dist)
    return d, (0.5 / d if d > 0 else 0.0)


def diversity_term(sq_to_frozen: Tensor, frozen_sq: Tensor, kind: str) -> tuple[float, Tensor]:
    """(value, d value / d sq_to_frozen) of the diversity of the active member.

    ``sq_to_frozen``: (m,) squared distances from the active member to the m frozen ones;
    ``frozen_sq``: (m, m) squared distances among the frozen members (only "volume" reads it).
    """
    if kind == "l2":
        d = sq_to_frozen.sqrt()
        coefs = torch.where(d > 0, 0.5 / (len(d) * d), torch.zeros_like(d))
        return float(d.mean()), coefs
    # volume: the simplex of all k = m + 1 members, differentiated through the tiny k x k
    # Cayley-Menger matrix only.
    s = sq_to_frozen.detach().clone().requires_grad_()
    top = torch.cat([s.new_zeros(1), s]).unsqueeze(0)  # the active member is vertex 0
    full = torch.cat([top, torch.cat([s.unsqueeze(1), frozen_sq], dim=1)])
    v2 = simplex_sq_volume(full)
    if v2 <= 0:  # degenerate simplex: the kink of sqrt, take the zero subgradient
        return 0.0, torch.zeros_like(sq_to_frozen)
    v = v2.sqrt()
    (coefs,) = torch.autograd.grad(v, s)
    return float(v.detach()), coefs


@torch.no_grad()
def add_distance_grad(
    grad: Tensor,
    rows: Tensor,
    coefs: Tensor,
    weight_sq: Tensor | None,
    scratch: Tensor,
    rms: bool = False,
    measure: bool = False,
) -> float:
    """grad += sum_i coefs[i] * d sq_dist(a, rows[i]) / da, where a = rows[-1].

    d sq_dist(a, p) / da = 2 w^2 (a - p) (/ D if ``rms``), and sum_i c_i (a - p_i) =
    (sum_i c_i) a - sum_i c_i p_i is one matrix-vector product over the rows, a included.
    Returns the norm of what was added when ``measure`` (one more pass over D), else nan.
    """
    c = torch.cat([-coefs, coefs.sum().reshape(1)]).to(rows)
    scale = 2.0 / rows.shape[1] if rms else 2.0
    if weight_sq is None and not measure:
        grad.addmv_(rows.t(), c, alpha=scale)
        return math.nan
    torch.mv(rows.t(), c, out=scratch)
    if weight_sq is not None:
        scratch.mul_(weight_sq)
    grad.add_(scratch, alpha=scale)
    return abs(scale) * float(torch.linalg.vector_norm(scratch)) if measure else math.nan


def regulariser(
    rows: Tensor,
    frozen_sq: Tensor,
    *,
    lambda_a: float,
    lambda_d: float,
    affinity: str,
    diversity: str,
    weight: Tensor | None,
    weight_sq: Tensor | None,
    grad: Tensor,
    scratch: Tensor,
    rms: bool = False,
    measure: bool = False,
) -> tuple[float, float]:
    """lambda_a * affinity(f_k, f_p) - lambda_d * diversity(f_k, frozen); its gradient -> grad.

    ``rows`` = [f_p, f_1, ..., f_{k-1}, f_k] (k + 1, D); the gradient is with respect to f_k.
    Returns (value, norm of its gradient if ``measure`` else nan).
    """
    k = rows.shape[0] - 1
    if lambda_d == 0 or k == 1:
        rows = rows[0 : k + 1 : k]  # f_p and f_k only: a strided view, no copy
    a, points = rows[-1], rows[:-1]
    sq = sq_distances(a, points, weight, scratch, rms)
    value_a, coef_a = affinity_term(float(sq[0]), affinity)
    value, coefs = lambda_a * value_a, torch.tensor([lambda_a * coef_a], dtype=torch.float64)
    if len(points) > 1:
        value_d, coef_d = diversity_term(sq[1:], frozen_sq, diversity)
        value, coefs = value - lambda_d * value_d, torch.cat([coefs, -lambda_d * coef_d])
    norm = add_distance_grad(grad, rows, coefs, weight_sq, scratch, rms, measure)
    return value, norm
