"""Trainer sweep on the embedded task, in one process (no gRPC: fast), in any regime.

The same data, pre-trained start, seeds, trainers and weighted aggregation as a real run
(``bench/regimes.py`` for the regimes), with the silos trained one after another in this
process. Each line: a trainer spec (JSON), the regime, the global accuracy after rounds
0..R per seed and their mean, and for LSS the pool's figures over every silo-round, measured
on 600 samples of the test split (which a real silo does not have): the members' mean
pairwise disagreement, the pool's spread, and how often the soup's loss was no higher than
its members' mean.

    python bench/lss_sweep.py --rounds 3 --seeds 0 1 --regimes generalist label \\
        '{"name": "fedavg", "epochs": 32}' '{"name": "lss", "exclude_head": true}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from regimes import REGIMES, apply_regime

from lssfl.common.config import parse_config
from lssfl.common.models import build_model, evaluate
from lssfl.common.seeding import derive_seed
from lssfl.dataprep.dataroot import prepare_data_root
from lssfl.dataprep.splits import load_split
from lssfl.server.aggregate import weighted_average
from lssfl.server.initial import initial_state
from lssfl.training.lss import LSSTrainer
from lssfl.training.trainers import make_trainer

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = 600  # test samples the pool figures are measured on


def run(
    spec: dict, regime: str, seed: int, rounds: int, root: Path, init: str = "pretrain"
) -> tuple[list[float], list[dict[str, float]]]:
    """Global accuracy after rounds 0..R, and the LSS metrics of every silo-round."""
    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    base["data"]["root"] = str(root)
    base["model"]["init"] = init
    base = apply_regime(base, regime)
    base["run"]["seed"] = seed
    cfg = parse_config(base)
    data = prepare_data_root(cfg)
    test = load_split(data.test_dir)
    silos = [load_split(data.silo_dirs[s]) for s in cfg.silos]
    pick = torch.randperm(len(test.y), generator=torch.Generator().manual_seed(123))[:HELD_OUT]
    held_out = (test.x[pick], test.y[pick])
    model = build_model(cfg.model_spec)
    model.load_state_dict(initial_state(cfg, data.pretrain_dir))
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    accs = [evaluate(model, test.x, test.y)[0]]
    pool: list[dict[str, float]] = []
    for r in range(1, rounds + 1):
        states = []
        for i, silo in enumerate(silos):
            model.load_state_dict(glob)
            s = derive_seed(seed, r, f"silo-{i + 1}")
            torch.manual_seed(s)
            trainer = make_trainer(spec)
            if isinstance(trainer, LSSTrainer):
                pool.append(trainer.train(model, silo.x, silo.y, seed=s, held_out=held_out))
            else:
                trainer.train(model, silo.x, silo.y, seed=s)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        glob = weighted_average(states, [s.num_samples for s in silos], glob)
        model.load_state_dict(glob)
        accs.append(evaluate(model, test.x, test.y)[0])
    return accs, pool


def pool_figures(pool: list[dict[str, float]]) -> dict[str, Any]:
    """Means over silo-rounds, and the fraction whose soup was no worse than its members."""
    if not pool or "pool_spread" not in pool[0]:
        return {}
    keys = ("pool_spread", "held_out_pool_disagreement", "distance_to_global", "reg_to_loss_grad")
    out: dict[str, Any] = {k: round(statistics.fmean(m[k] for m in pool), 4) for k in keys}
    out["soup_not_worse"] = sum(
        m["held_out_soup_loss"] <= m["held_out_member_loss"] for m in pool
    ) / len(pool)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="trainer specs as JSON")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", default=["generalist"], choices=list(REGIMES))
    parser.add_argument("--root", type=Path, default=None, help="data folder (kept: a cache)")
    parser.add_argument("--init", default="pretrain", choices=["pretrain", "random"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.root or Path(tempfile.mkdtemp()) / "embedded"
    for text in args.specs:
        spec = json.loads(text)
        for regime in args.regimes:
            t0 = time.monotonic()
            res = [run(spec, regime, s, args.rounds, root, args.init) for s in args.seeds]
            accs = [a for a, _ in res]
            mean = [statistics.fmean(a[r] for a in accs) for r in range(args.rounds + 1)]
            print(json.dumps({
                "spec": spec, "regime": regime, "init": args.init,
                "accuracy_mean": mean, "per_seed": accs,
                "pool": pool_figures([m for _, p in res for m in p]),
                "seconds": round(time.monotonic() - t0, 1),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
