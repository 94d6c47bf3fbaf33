"""Label-skewed splits: each class dealt to the silos in Dirichlet(alpha) shares.

The usual meaning of ``alpha`` in federated learning (Hsu et al., 2019): for every class
``c``, shares ``q_c ~ Dir(alpha, ..., alpha)`` over the silos decide how that class's samples
are divided. Small alpha (0.1) gives each class to one or two silos, so silos see few
classes; large alpha (100) gives every silo nearly every class in the global proportions.
One partitioner for both the embedded data (``data.alpha``) and ``lssfl partition --alpha``.
"""

from __future__ import annotations

import math

import numpy as np

# Floor on a silo's size under heavy label skew, so that no silo trains on (almost) nothing.
MIN_SILO_SAMPLES = 10
# Redraws of the Dirichlet shares before topping starved silos up by hand: redrawing keeps
# the drawn distribution exact, topping up distorts it a little, so it is the last resort.
DIRICHLET_RETRIES = 100


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` as close as possible to ``weights`` shares."""
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(share - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def min_silo_samples(num_samples: int, num_silos: int) -> int:
    """The per-silo floor: MIN_SILO_SAMPLES, or an equal share when data is that scarce."""
    return max(1, min(MIN_SILO_SAMPLES, num_samples // num_silos))


def check_counts(num_samples: int, num_silos: int) -> None:
    """ValueError unless ``num_samples`` can give each of ``num_silos`` silos a sample."""
    if not isinstance(num_silos, int) or num_silos < 1:
        raise ValueError(f"--silos must be a positive integer, got {num_silos!r}")
    if num_samples < num_silos:
        raise ValueError(f"{num_samples} training samples cannot fill {num_silos} silos")


def check_alpha(alpha: float, name: str = "alpha") -> None:
    """ValueError, naming the setting ``name``, unless ``alpha`` is a finite positive number."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"{name} must be a positive number, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{name} must be a positive number, got {alpha!r}")


def dirichlet_split(
    labels: np.ndarray, num_silos: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed disjoint parts covering every index of ``labels``, each sorted.

    Each class's samples are dealt to silos in Dirichlet(alpha) shares. Draws leaving a silo
    under :func:`min_silo_samples` are redrawn; if that keeps failing (tiny alpha, many
    silos), starved silos take random samples from the largest one.
    """
    check_counts(len(labels), num_silos)
    check_alpha(alpha)
    floor = min_silo_samples(len(labels), num_silos)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(DIRICHLET_RETRIES):
        parts: list[list[int]] = [[] for _ in range(num_silos)]
        for members in by_class:
            shares = rng.dirichlet(np.full(num_silos, alpha))
            # Tiny alphas can underflow to all zeros (then NaN); fall back to one winner.
            shares = np.nan_to_num(shares, nan=0.0) + 1e-12
            counts = largest_remainder(shares, len(members))
            for silo, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
                parts[silo].extend(chunk.tolist())
        if min(len(p) for p in parts) >= floor:
            break
    for silo in range(num_silos):
        while len(parts[silo]) < floor:
            donor = max(range(num_silos), key=lambda s: len(parts[s]))
            parts[silo].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
