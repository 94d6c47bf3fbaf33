"""The benchmark's regimes: overlays on configs/demo.yaml that change what the silos hold and
what the start knows, so that LSS is measured where holding the backbone pays and where it
does not.

- ``generalist``: the demo. A start pre-trained on the public split in all five domains, one
  domain per silo (feature shift): the paper's setting.
- ``partial``: the start is pre-trained on only two of the five domains (original, rotated);
  the silos hold all five, so the features must move for three of them.
- ``label``: label shift alone: every silo holds the original domain, each class dealt over
  the 5 silos in Dirichlet(0.1) shares; the same generalist start.
"""

from __future__ import annotations

from typing import Any

REGIMES: dict[str, dict[str, Any]] = {
    "generalist": {},
    "partial": {"pretrain_domains": ["original", "rotated"]},
    "label": {"domains": ["original"], "alpha": 0.1},
}


def apply_regime(cfg: dict[str, Any], regime: str) -> dict[str, Any]:
    """``cfg`` (a run config as plain data) with ``regime``'s data section, in its own folder."""
    out = {**cfg, "data": {**cfg["data"], **REGIMES[regime]}}
    if regime != "generalist":
        out["data"]["root"] = f"{cfg['data']['root']}-{regime}"
    return out
