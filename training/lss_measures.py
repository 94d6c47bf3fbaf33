"""What LSS measures about its pool and at the received model: the pool's spread and how its
members differ in function (the collapse rule and its warnings), and the loss's gradient at
f_p (``lambda_units: loss_grad``, importance weights). ``docs/lss.md`` defines each figure.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lssfl.training.lss_distances import pairwise_sq_distances, sq_distances

# A pool is alive when its members are, on average, at least this far from each other relative
# to how far they moved from the received model (``pool_spread``): a ratio of two distances in
# one model, so it means the same at any parameter count or weight scale. Under it the soup
# is within a few percent of any one member: one model, not a soup.
ALIVE_SPREAD = 0.1
# Local samples the members' predictions are compared on (N + 1 eval passes over them).
AGREEMENT_SAMPLES = 2048


def pool_diagnostics(
    anchor: Tensor, members: Tensor, soup: Tensor, scratch: Tensor
) -> dict[str, float]:
    """RMS distance of the soup to f_p (``anchor``) and, with two members or more, the
    smallest RMS distance between members and the pool's spread (their mean pairwise
    distance over their mean distance from f_p).

    RMS whatever ``rms_distances`` says, so the figures compare across models and runs.
    """
    out = {
        "distance_to_global": math.sqrt(
            float(sq_distances(soup, anchor[None], None, scratch, rms=True)[0])
        )
    }
    n = len(members)
    if n > 1:
        sq = pairwise_sq_distances(members, None, scratch, rms=True)
        off = sq[~torch.eye(n, dtype=torch.bool)]
        out["min_member_distance"] = math.sqrt(float(off.min().clamp_min(0)))
        travel = sq_distances(anchor, members, None, scratch, rms=True).clamp_min(0)
        mean_travel = float(travel.sqrt().mean())
        out["pool_spread"] = (
            float(off.clamp_min(0).sqrt().mean()) / mean_travel if mean_travel > 0 else 0.0
        )
    return out


@torch.no_grad()
def _logits(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    return torch.cat([functional_call(model, dict(params), (xb,)) for xb in x.split(512)]).float()


def member_agreement(
    model: nn.Module,
    members: Sequence[Mapping[str, Tensor]],
    soup: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
) -> dict[str, float]:
    """How the pool's members (each a parameter mapping for ``model``) differ in function on
    (x, y), in eval mode.

    ``pool_disagreement``: the mean over member pairs of the fraction of samples on which
    their predicted classes differ; ``soup_loss`` and ``member_loss`` (mean over members)
    the cross-entropy of the soup and of the members, and their accuracies.
    """
    was_training = model.training
    model.eval()
    try:
        logits = [_logits(model, m, x) for m in members]
        soup_logits = _logits(model, soup, x)
    finally:
        model.train(was_training)
    preds = [lg.argmax(1) for lg in logits]
    pairs = [(i, j) for i in range(len(preds)) for j in range(i + 1, len(preds))]
    disagree = [float((preds[i] != preds[j]).double().mean()) for i, j in pairs]
    return {
        "pool_disagreement": sum(disagree) / len(disagree) if disagree else 0.0,
        "soup_loss": float(F.cross_entropy(soup_logits, y)),
        "member_loss": sum(float(F.cross_entropy(lg, y)) for lg in logits) / len(logits),
        "soup_accuracy": float((soup_logits.argmax(1) == y).double().mean()),
        "member_accuracy": sum(float((p == y).double().mean()) for p in preds) / len(preds),
    }


def batch_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    batch_size: int,
    fixed: Mapping[str, Tensor] | None = None,
) -> Iterator[tuple[Tensor | None, ...]]:
    """For each local batch in order, the cross-entropy's gradient with respect to ``params``
    (leaves that require grad; None where one is unused), the model's other parameters
    as they are or as in ``fixed``. Train mode on copies of the buffers: BatchNorm running
    statistics do not move."""
    leaves = list(params.values())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    given = dict(params) | dict(fixed or {}) | buffers
    for idx in torch.arange(len(x), device=x.device).split(batch_size):
        logits = functional_call(model, given, (x[idx],))
        loss = F.cross_entropy(logits.float(), y[idx])
        yield torch.autograd.grad(loss, leaves, allow_unused=True)


def importance_weights(
    model: nn.Module, names: list[str], x: Tensor, y: Tensor, batch_size: int
) -> Tensor:
    """Flat per-parameter weights: sqrt(mean squared batch gradient at the current weights).

    Clamped to [1e-8, 1e8] (reference), then scaled to RMS 1 (so that the lambdas keep their
    meaning). The forward passes run in train mode on copies of the buffers: BatchNorm running
    statistics do not move.
    """
    params = dict(model.named_parameters())
    chosen = {n: params[n] for n in names}
    sq = [torch.zeros_like(p) for p in chosen.values()]
    count = 0
    for grads in batch_gradients(model, chosen, x, y, batch_size):
        for s, g in zip(sq, grads, strict=True):
            if g is not None:
                s.addcmul_(g, g)
        count += 1
    w = torch.cat([t.reshape(-1) for t in sq])
    w = w.div_(max(count, 1)).sqrt_().clamp_(1e-8, 1e8)
    return w.div_(w.square().mean().sqrt())


def loss_grad_norm(
    model: nn.Module,
    params: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    batch_size: int,
) -> float:
    """Mean over the local batches of the norm of the loss's gradient over ``params``."""
    norms = [
        math.sqrt(sum(float(g.square().sum()) for g in grads if g is not None))
        for grads in batch_gradients(model, params, x, y, batch_size, fixed)
    ]
    return sum(norms) / max(len(norms), 1)


def collapsed_pools(spreads: dict[str, float]) -> str | None:
    """One line for the coordinator when most silos' pools collapsed this round, else None.

    ``spreads``: each reporting silo's ``pool_spread``.
    """
    low = sorted(s for s, v in spreads.items() if v < ALIVE_SPREAD)
    if not spreads or 2 * len(low) <= len(spreads):
        return None
    return (
        f"the LSS pool collapsed at {len(low)} of {len(spreads)} silos ({', '.join(low[:5])}"
        f"{', ...' if len(low) > 5 else ''}: spread "
        f"{min(spreads.values()):.3f}-{max(spreads[s] for s in low):.3f}, alive from "
        f"{ALIVE_SPREAD:g}), so their soups are single models: lower trainer.lambda_a or "
        "raise trainer.lambda_d"
    )
