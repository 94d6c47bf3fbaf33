"""The data a silo keeps out of training to measure the received model on (evaluation at the
silos): its own test split when it has one, else a fraction drawn from (run seed, silo id)."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from lssfl.common.seeding import seed_of
from lssfl.dataprep.silodata import LazyImages, subset

Images = Tensor | LazyImages


def evaluation_settings(text: str) -> dict[str, Any]:
    """The task's evaluation_json, checked: {"holdout": fraction in (0, 1), "seed": int}.
    The coordinator may be hostile too: anything else stops the silo with one line."""
    try:
        settings = json.loads(text)
        holdout, seed = settings["holdout"], settings["seed"]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"task evaluation_json {text[:200]!r} is not valid") from None
    if not (isinstance(holdout, float) and 0.0 < holdout < 1.0) or not isinstance(seed, int):
        raise ValueError(f"task evaluation_json {text[:200]!r} is out of range")
    return {"holdout": holdout, "seed": seed}


def drawn_split(
    x: Images, y: Tensor, *, settings: dict[str, Any], silo_id: str
) -> tuple[Images, Tensor, Images, Tensor]:
    """(train x, y, held-out x, y): ``settings["holdout"]`` of the samples (at least one,
    and one left to train on) drawn from (``settings["seed"]``, ``silo_id``)."""
    n = len(y)
    generator = torch.Generator().manual_seed(seed_of("holdout", settings["seed"], silo_id))
    order = torch.randperm(n, generator=generator)
    cut = min(n - 1, max(1, round(settings["holdout"] * n)))
    held, train = order[:cut].sort().values, order[cut:].sort().values
    return (
        subset(x, train),
        y[train.to(y.device)],
        subset(x, held),
        y[held.to(y.device)],
    )
