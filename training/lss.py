"""Local Superior Soups (Chen et al., NeurIPS 2024): local training that returns a model soup.

Paper: Minghui Chen, Meirui Jiang, Xin Zhang, Qi Dou, Zehua Wang, Xiaoxiao Li, "Local Superior
Soups: A Catalyst for Model Merging in Cross-Silo Federated Learning", NeurIPS 2024
(arXiv:2410.23660). ``docs/lss.md`` describes the method, its units and how this code differs
from the authors'.

One silo, one round. Starting from the received weights f_p, train N pool members one after
another. Member 1 starts at f_p; member k starts at the uniform average of members 1..k-1,
which are then frozen. Each step draws interpolation weights alpha ~ Dirichlet(1, ..., 1) over
the k current members, evaluates the loss at the soup f_s = sum_i alpha_i f_i, and updates only
f_k (the gradient reaches it through alpha_k * f_k):

    loss = CE(f_s; batch) + lambda_a * affinity(f_k, f_p) - lambda_d * diversity(f_k, pool)

The silo uploads the uniform average of the N members.

Distances. By default every distance is the paper's L2 distance over the D pooled parameters,

    dist(a, b) = ||w * (a - b)||_2

(w = 1 unless ``importance`` is on), so the paper's lambda = 3 works as written. Its value
grows like sqrt(D): the same lambda pulls a 40k-parameter CNN and an 11M-parameter ResNet
with the same gradient norm (lambda per unit of distance), whatever D. ``rms_distances=True``
divides by sqrt(D) instead (the root-mean-square displacement of one weight): values are
size-free, and lambda_rms = lambda_paper * sqrt(D). affinity "l2" is dist(f_k, f_p) (paper),
"sq_l2" its square (authors' code). diversity "l2" is the mean of dist(f_k, f_i) over the
frozen members (paper); "volume" is the volume of the simplex spanned by all k members, from
the Cayley-Menger determinant of their squared distances, normalised by ((k-1)!)^2 * 2^(k-1)
so that it is the true (k-1)-volume; it scales like dist^(k-1), so lambda_d for it needs its
own value. Where a distance (or the volume) is 0 its gradient is taken as 0, the subgradient
at the kink: member 1 starts at f_p, member 2 as a copy of member 1, and member 3 on the
segment between members 1 and 2.

Importance weights (``importance=True``): w = sqrt(mean over the local batches of the
squared gradient of the loss at f_p), clamped to [1e-8, 1e8] as in the reference, then
divided by its RMS so that uniform importance gives back the plain distance and the
lambdas keep their meaning. Computed once per round; BatchNorm statistics are left untouched.

Head (``exclude_head=True``): the parameters of the last ``nn.Linear`` in
``model.modules()`` order (registration order, which is the classifier for every model in
lssfl.common.models) stay out of the pool: one shared copy, trained along with every member
and uploaded as it ends. It is not interpolated and not part of any distance. The paper's
setting replaces the head of a pre-trained network; a fresh head pooled and pulled towards
its random start by the affinity term does not learn, so the run config turns this on by
default whenever the initial model's head was replaced (``model.init`` other than random).
With the head out of the pool, ``head_epochs`` (lssfl's default 8, the paper's 0) train it
alone on f_p before the first member (a linear probe, in train mode as the pool runs), so
that the backbone's first gradients come from a head that fits the data, not a random one.

Defaults. lssfl's differ from the paper's in two places: the probe, and lambda_a = lambda_d
= 0. Measured in three regimes (docs/lss.md), any affinity holds the backbone at f_p once the
local loss is small next to its gradient noise (few classes per silo, a start that fits),
which costs up to 24 points where the features must move; ``lss-paper``
(:class:`PaperLSSTrainer`) keeps the paper's lambda = 3 without the probe.

Schedule: every member trains ``epochs_per_member`` epochs ("equal", the paper's text), or
the first one does and the later ones ``max(1, epochs_per_member // 8)`` ("authors", the
authors' code).

BatchNorm running statistics are buffers, not pool members: the model's one copy is updated
in place by the interpolated forward passes (``interp_samples`` passes per step, one while
member 1 trains alone) and uploaded as it ends.

Diagnostics (returned with the metrics, so they reach the coordinator's metrics.jsonl): the
pool's spread (the members' mean pairwise distance over their mean distance from f_p: a
ratio within one weight space, so the same at any parameter count or weight scale), how
often two members predict different classes on the local samples, the soup's and the
members' loss there, the RMS distance of the soup to f_p, the smallest RMS distance between
two members, and the ratio of the regulariser's gradient norm to the loss's, sampled every
``DIAGNOSTIC_EVERY`` steps. A pool whose spread is under ``ALIVE_SPREAD`` has collapsed onto
one model: the trainer logs one warning line, and the coordinator one when most silos' did.

How it is fast. f_p and the N members are the rows of one (N + 1, D) buffer. The active
member trains in place in its row through parameter-shaped leaf views, whose gradients are
views of one flat buffer, so the optimizer sees ordinary per-parameter tensors, exactly as in
FedAvg. A step mixes the members with one matrix-vector product into a preallocated soup
buffer, runs the model with ``torch.func.functional_call`` on views of that buffer, and
copies alpha_k times the soup's gradient onto the active member (d f_s / d f_k = alpha_k I).
The regulariser gradient is closed form: a sum of terms c_i * (f_k - row_i), i.e. one more
matrix-vector product over the same rows. No D-sized tensor is allocated per step (on CPU a
fresh 45 MB tensor costs more in page faults than the arithmetic), and autograd never sees
the pool. Extra work per step is O(N * D) elementwise, next to a forward and backward pass.

Randomness: batch order comes from ``torch.Generator().manual_seed(seed)``, exactly as in
FedAvgTrainer (N = 1 with both lambdas 0 is FedAvg, bit for bit); interpolation weights come
from a second generator seeded from ``seed``. Same seed and inputs give bit-identical
weights on CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lssfl.common.models import head_parameter_names
from lssfl.training.loop import LocalSteps, batches
from lssfl.training.lss_distances import (
    AFFINITIES,
    DIVERSITIES,
    pairwise_sq_distances,
    regulariser,
)
from lssfl.training.lss_measures import (
    AGREEMENT_SAMPLES,
    ALIVE_SPREAD,
    importance_weights,
    loss_grad_norm,
    member_agreement,
    pool_diagnostics,
)

LAMBDA_UNITS = ("l2", "loss_grad", "step_grad")
SCHEDULES = ("equal", "authors")
# The gradient-norm diagnostic costs two passes over D; every 16th step is plenty for a mean.
DIAGNOSTIC_EVERY = 16

log = logging.getLogger("lssfl.training")


# --- flat parameter vectors -------------------------------------------------------------------


@dataclass(frozen=True)
class FlatLayout:
    """Where each named parameter lives in a flat vector: concatenated in ``names`` order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, named: Sequence[tuple[str, Tensor]]) -> FlatLayout:
        """The layout of ``named`` (name, tensor) pairs, in that order."""
        return cls(tuple(n for n, _ in named), tuple(t.shape for _, t in named))

    @property
    def numels(self) -> list[int]:
        """Element count of each parameter."""
        return [math.prod(s) for s in self.shapes]

    @property
    def dim(self) -> int:
        """D, the length of the flat vector."""
        return sum(self.numels)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Parameter-shaped views of ``flat``: writing into them writes into ``flat``."""
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes, strict=True)]

    def flatten(self, tensors: list[Tensor], out: Tensor | None = None) -> Tensor:
        """Concatenate ``tensors`` (in layout order) into one flat vector, into ``out`` if given."""
        return torch.cat([t.reshape(-1) for t in tensors], out=out)


# --- the pool ---------------------------------------------------------------------------------


class Pool:
    """f_p and the N members of one round as the rows of one (N + 1, D) buffer.

    Row 0 is f_p, row i the i-th member. Finished members are frozen (only ever read). The
    active member trains in place in the next row: ``start_member`` returns parameter-shaped
    leaf views of that row for the optimizer, with gradients that are views of ``grad``.
    """

    def __init__(self, layout: FlatLayout, capacity: int, like: Tensor) -> None:
        self.layout = layout
        self.rows = like.new_empty(capacity + 1, layout.dim)
        self.grad = like.new_zeros(layout.dim)
        self.size = 0  # finished members
        self.active_params: list[Tensor] = []

    @property
    def capacity(self) -> int:
        """N, the number of members the pool holds."""
        return self.rows.shape[0] - 1

    @property
    def anchor(self) -> Tensor:
        """Row 0: f_p, the weights received this round."""
        return self.rows[0]

    @property
    def frozen(self) -> Tensor:
        """The finished members' rows."""
        return self.rows[1 : self.size + 1]

    @property
    def active(self) -> Tensor:
        """The row of the member that trains next (or now)."""
        return self.rows[self.size + 1]

    @torch.no_grad()
    def start_member(self) -> list[Tensor]:
        """Put the next member at the pool average (f_p for the first) and make it trainable."""
        if self.active_params:
            raise RuntimeError("a member is already training")
        if self.size == self.capacity:
            raise RuntimeError(f"the pool is full ({self.capacity} members)")
        if self.size == 0:
            self.active.copy_(self.anchor)
        else:
            torch.mean(self.frozen, dim=0, out=self.active)
        params = [v.requires_grad_() for v in self.layout.views(self.active)]
        for p, g in zip(params, self.layout.views(self.grad), strict=True):
            p.grad = g
        self.active_params = params
        return params

    def finish_member(self) -> None:
        """Freeze the active member."""
        for p in self.active_params:
            p.grad = None
            p.requires_grad_(False)
        self.active_params = []
        self.size += 1

    def average(self) -> Tensor:
        """Uniform average of the finished members: the soup the silo uploads."""
        return self.frozen.mean(dim=0)


# --- the pieces of one step, as plain functions -----------------------------------------------


def sample_alphas(k: int, samples: int, generator: torch.Generator) -> Tensor:
    """(samples, k) float64 interpolation weights, uniform on the simplex (Dirichlet(1, ..., 1)).

    Normalised Exp(1) draws, as in the reference. With one member every draw is [1], so one row
    is returned and nothing is drawn.
    """
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    e = torch.empty(samples, k, dtype=torch.float64).exponential_(generator=generator)
    return e / e.sum(dim=1, keepdim=True)


@torch.no_grad()
def interpolate(members: Tensor, alpha: Tensor, out: Tensor) -> Tensor:
    """out = sum_i alpha_i * members[i]: one read of the frozen rows, no autograd."""
    if len(alpha) == 1:
        return torch.mul(members[0], float(alpha[0]), out=out)
    frozen, active = members[:-1], members[-1]
    return torch.addmv(active, frozen.t(), alpha[:-1].to(members), beta=float(alpha[-1]), out=out)


# --- the trainer ------------------------------------------------------------------------------


@dataclass
class RoundState:
    """Everything LSS holds during one round, besides the model and the optimizer."""

    layout: FlatLayout  # the pooled parameters
    pool: Pool
    # f_s, flat, rewritten before every forward pass. Between a backward pass and the next
    # interpolation its contents are dead, so the regulariser uses it as scratch space.
    soup: Tensor
    soup_params: list[Tensor]  # leaf views of ``soup``: what the forward pass sees
    head: dict[str, Tensor]  # the shared head (empty unless exclude_head)
    weight: Tensor | None  # importance weights w, and w^2
    weight_sq: Tensor | None
    frozen_sq: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    lambda_scale: float = 1.0  # what one unit of lambda is, as a gradient norm

    def params_at(self, flat: Tensor) -> dict[str, Tensor]:
        """The model's parameters with the pooled ones at ``flat`` (views) and the head."""
        return dict(zip(self.layout.names, self.layout.views(flat), strict=True)) | self.head


@dataclass
class LSSTrainer(LocalSteps):
    """Local Superior Soups; see the module docstring. One epoch = one pass over the local data.

    The defaults are lssfl's: the paper's Adam 5e-4, batch 64 and N = 4 members of 8 epochs
    each, after a linear probe of the new head (``head_epochs`` 8), with both regularisers off
    (lambda_a = lambda_d = 0): measured in three regimes (docs/lss.md), the paper's lambda = 3
    holds the backbone at its start wherever the local loss is small next to the gradient
    noise, and loses up to 24 points where the features must move. ``PaperLSSTrainer``
    (``lss-paper``) keeps the paper's protocol. ``exclude_head`` defaults to False here; a run
    config sets it from ``model.init`` (see the module docstring).
    """

    pool_size: int = 4
    epochs_per_member: int = 8
    lambda_a: float = 0.0
    lambda_d: float = 0.0
    affinity: str = "l2"  # "l2" (paper) or "sq_l2" (authors' code)
    diversity: str = "l2"  # "l2" (paper, mean distance to the frozen members) or "volume"
    rms_distances: bool = False  # distances divided by sqrt(D): lambda_rms = lambda * sqrt(D)
    importance: bool = False  # gradient-based per-parameter weights in every distance
    exclude_head: bool = False  # last nn.Linear: one shared copy, not pooled
    schedule: str = "equal"  # "equal" or "authors": later members epochs_per_member // 8
    interp_samples: int = 1  # alpha draws per batch, loss averaged (reference: 2)
    amp: bool = False  # bfloat16 autocast for the forward pass; CUDA only, ignored on CPU
    # "l2": a lambda is a gradient norm (paper). "loss_grad": a multiple of the mean norm of
    # the loss's gradient over the pooled weights at f_p, measured once a round; "step_grad":
    # a multiple of the loss gradient's norm at each step (the regulariser-to-loss ratio).
    lambda_units: str = "l2"
    # Epochs training the shared head alone on f_p before the pool (a linear probe); only
    # with ``exclude_head``, else there is no shared head and it does nothing.
    head_epochs: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("pool_size", "epochs_per_member", "batch_size", "interp_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"lss: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lambda_a", "lambda_d"):
            if getattr(self, name) < 0:
                raise ValueError(f"lss: {name} must be >= 0, got {getattr(self, name)}")
        if self.affinity not in AFFINITIES:
            raise ValueError(f"lss: affinity {self.affinity!r} not in {AFFINITIES}")
        if self.diversity not in DIVERSITIES:
            raise ValueError(f"lss: diversity {self.diversity!r} not in {DIVERSITIES}")
        if self.lambda_units not in LAMBDA_UNITS:
            raise ValueError(f"lss: lambda_units {self.lambda_units!r} not in {LAMBDA_UNITS}")
        if self.head_epochs < 0:
            raise ValueError(f"lss: head_epochs must be >= 0, got {self.head_epochs}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"lss: schedule {self.schedule!r} not in {SCHEDULES}")

    def local_epochs(self) -> int:
        """Passes over the local data one round costs: the probe's and every member's."""
        # Closed form: a silo asks this of a task before running it, whatever pool_size says.
        later = (self.pool_size - 1) * self.member_epochs(1)
        return self.head_epochs * self.exclude_head + self.member_epochs(0) + later

    def member_epochs(self, member: int) -> int:
        """Epochs of member ``member`` (0-based) under the schedule."""
        if self.schedule == "authors" and member > 0:
            return max(1, self.epochs_per_member // 8)
        return self.epochs_per_member

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seed: int,
        held_out: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, float]:
        """Run one round of LSS on (x, y) from the weights in ``model``; leave the soup in it.

        Returns the mean cross-entropy at the soups (``train_loss``), the mean regulariser
        value (``reg_loss``) and the pool diagnostics (see the module docstring); with
        ``held_out`` (x, y) also the functional ones measured there, as ``held_out_<name>``
        (benchmarks: a silo's trainer sees its training data only).
        """
        batch_generator = torch.Generator().manual_seed(seed)  # the same draws as FedAvg
        alpha_generator = torch.Generator().manual_seed(_alpha_seed(seed))
        model.train()
        state = self.prepare(model, x, y)
        if self.head_epochs and state.head:
            self.train_head(model, state, x, y, batch_generator)
        if self.lambda_units == "loss_grad":
            at_anchor = {
                n: v.detach().clone().requires_grad_()
                for n, v in zip(
                    state.layout.names, state.layout.views(state.pool.anchor), strict=True
                )
            }
            head = {n: h.detach() for n, h in state.head.items()}
            state.lambda_scale = loss_grad_norm(model, at_anchor, head, x, y, self.batch_size)
        ce_total, reg_total, seen, steps = 0.0, 0.0, 0, 0
        ratios: list[float] = []
        for member in range(self.pool_size):
            opt = self.start_member(state)
            k = state.pool.size + 1
            for _ in range(self.member_epochs(member)):
                for idx in batches(len(x), self.batch_size, batch_generator, x.device):
                    alphas = sample_alphas(k, self.interp_samples, alpha_generator)
                    measure = steps % DIAGNOSTIC_EVERY == 0
                    ce, reg, ratio = self.step(model, state, opt, x[idx], y[idx], alphas, measure)
                    ce_total += ce * len(idx)
                    reg_total += reg
                    seen += len(idx)
                    steps += 1
                    if measure and not math.isnan(ratio):
                        ratios.append(ratio)
            state.pool.finish_member()
        functional = {}
        if self.pool_size > 1:
            members = [state.params_at(row) for row in state.pool.frozen]
            soup_params = state.params_at(state.pool.average())
            n = AGREEMENT_SAMPLES
            functional = member_agreement(model, members, soup_params, x[:n], y[:n])
            if held_out is not None:
                more = member_agreement(model, members, soup_params, *held_out)
                functional |= {f"held_out_{k}": v for k, v in more.items()}
        soup = self.load_result(model, state)
        diagnostics = pool_diagnostics(state.pool.anchor, state.pool.frozen, soup, state.soup)
        diagnostics["reg_to_loss_grad"] = sum(ratios) / len(ratios) if ratios else 0.0
        diagnostics["lambda_scale"] = state.lambda_scale
        # A diagnostic never costs the round its upload: a loss that is not finite (a model
        # whose eval-mode predictions are NaN) is left out; the coordinator refuses NaN.
        diagnostics.update({k: v for k, v in functional.items() if math.isfinite(v)})
        if self.pool_size > 1 and diagnostics["pool_spread"] < ALIVE_SPREAD:
            log.warning(
                "lss: the pool collapsed: its members are %.2f as far from each other as from "
                "the received model (a live pool: %.2f or more) and disagree on %.1f %% of the "
                "local samples, so the soup is close to one model; the regulariser's gradient "
                "is %.1fx the loss's (lambda_a %g, lambda_d %g): raise lambda_d or lower "
                "lambda_a",
                diagnostics["pool_spread"],
                ALIVE_SPREAD,
                100 * diagnostics["pool_disagreement"],
                diagnostics["reg_to_loss_grad"],
                self.lambda_a,
                self.lambda_d,
            )
        return {
            "train_loss": ce_total / max(seen, 1),
            "reg_loss": reg_total / max(steps, 1),
            **diagnostics,
        }

    def prepare(self, model: nn.Module, x: Tensor, y: Tensor) -> RoundState:
        """Copy f_p into a fresh pool and allocate the per-round buffers."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head_names = set(head_parameter_names(model)) if self.exclude_head else set()
        pooled = [(n, p) for n, p in named if n not in head_names]
        if not pooled:
            raise ValueError("lss: the model has no trainable parameters outside the head")
        layout = FlatLayout.of(pooled)
        pool = Pool(layout, self.pool_size, pooled[0][1])
        layout.flatten([p.detach() for _, p in pooled], out=pool.anchor)
        soup = torch.empty_like(pool.anchor)
        weight = None
        if self.importance:
            weight = importance_weights(model, list(layout.names), x, y, self.batch_size)
        return RoundState(
            layout=layout,
            pool=pool,
            soup=soup,
            soup_params=[v.requires_grad_() for v in layout.views(soup)],
            head={n: p.detach().clone().requires_grad_() for n, p in named if n in head_names},
            weight=weight,
            weight_sq=None if weight is None else weight * weight,
        )

    def train_head(
        self, model: nn.Module, state: RoundState, x: Tensor, y: Tensor, gen: torch.Generator
    ) -> None:
        """Linear probe: ``head_epochs`` epochs of the shared head alone, the rest held at f_p."""
        frozen = dict(zip(state.layout.names, state.layout.views(state.pool.anchor), strict=True))
        opt = self.make_optimizer(list(state.head.values()))
        for _ in range(self.head_epochs):
            for idx in batches(len(x), self.batch_size, gen, x.device):
                logits = functional_call(model, frozen | state.head, (x[idx],))
                loss = F.cross_entropy(logits.float(), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def start_member(self, state: RoundState) -> torch.optim.Optimizer:
        """Start the next member; each member gets a fresh optimizer (so does the shared head)."""
        pool = state.pool
        if self.diversity == "volume":  # fixed while this member trains
            state.frozen_sq = pairwise_sq_distances(
                pool.frozen, state.weight, state.soup, self.rms_distances
            )
        params = pool.start_member()
        return self.make_optimizer(params + list(state.head.values()))

    def step(
        self,
        model: nn.Module,
        state: RoundState,
        opt: torch.optim.Optimizer,
        x: Tensor,
        y: Tensor,
        alphas: Tensor,
        measure: bool = False,
    ) -> tuple[float, float, float]:
        """One update of the active member on (x, y); ``alphas`` (samples, k).

        Returns (CE, regulariser value, regulariser-to-loss gradient norm ratio); the ratio is
        nan unless ``measure`` and the regulariser is on.
        """
        pool = state.pool
        k = pool.size + 1
        members = pool.rows[1 : k + 1]
        for h in state.head.values():
            h.grad = None
        autocast = torch.autocast(
            x.device.type, dtype=torch.bfloat16, enabled=self.amp and x.device.type == "cuda"
        )
        ce = 0.0
        for s, alpha in enumerate(alphas):
            interpolate(members, alpha, out=state.soup)
            params = dict(zip(state.layout.names, state.soup_params, strict=True))
            with autocast:
                logits = functional_call(model, params | state.head, (x,))
            loss = F.cross_entropy(logits.float(), y)
            (loss / len(alphas)).backward()
            _move_grad(state.soup_params, pool.active_params, float(alpha[-1]), first=s == 0)
            ce += loss.item()
        reg, ratio = 0.0, math.nan
        if self.lambda_a or (self.lambda_d and k > 1):
            loss_norm = (
                float(torch.linalg.vector_norm(pool.grad))
                if measure or self.lambda_units == "step_grad"
                else math.nan
            )
            if self.lambda_units == "step_grad":
                state.lambda_scale = loss_norm
            reg, reg_norm = regulariser(
                pool.rows[: k + 1],
                state.frozen_sq,
                lambda_a=self.lambda_a * state.lambda_scale,
                lambda_d=self.lambda_d * state.lambda_scale,
                affinity=self.affinity,
                diversity=self.diversity,
                weight=state.weight,
                weight_sq=state.weight_sq,
                grad=pool.grad,
                scratch=state.soup,  # free until the next interpolation
                rms=self.rms_distances,
                measure=measure,
            )
            if measure and loss_norm > 0:
                ratio = reg_norm / loss_norm
        opt.step()
        return ce / len(alphas), reg, ratio

    @torch.no_grad()
    def load_result(self, model: nn.Module, state: RoundState) -> Tensor:
        """Write the pool average (and the shared head) into ``model``; return the flat soup."""
        soup = state.pool.average()
        params = dict(model.named_parameters())
        for name, v in zip(state.layout.names, state.layout.views(soup), strict=True):
            params[name].copy_(v)
        for name, h in state.head.items():
            params[name].copy_(h)
        return soup


@dataclass
class PaperLSSTrainer(LSSTrainer):
    """LSS in the paper's protocol (trainer name ``lss-paper``): lambda_a = lambda_d = 3 on L2
    distances, no linear probe. What lssfl shipped before the regime benchmark, and the
    setting whose results match the authors' code (docs/lss.md)."""

    lambda_a: float = 3.0
    lambda_d: float = 3.0
    head_epochs: int = 0


@torch.no_grad()
def _move_grad(
    soup_params: list[Tensor], active: list[Tensor], alpha_k: float, first: bool
) -> None:
    """active.grad (+)= alpha_k * soup.grad, parameter by parameter; clears the soup's grads."""
    for s, a in zip(soup_params, active, strict=True):
        target = a.grad
        assert target is not None  # Pool.start_member gives every active parameter its grad
        if s.grad is None:  # parameter unused by the forward pass
            if first:
                target.zero_()
            continue
        if first:
            torch.mul(s.grad, alpha_k, out=target)
        else:
            target.add_(s.grad, alpha=alpha_k)
        s.grad = None


def _alpha_seed(seed: int) -> int:
    """A second stream from the round seed (one LCG step), so alphas leave batch order alone."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**64
