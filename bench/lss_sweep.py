"""Coefficient sweep for LSS on the embedded task, in one process (no gRPC: fast).

The same data, pre-trained start, seeds, trainers and weighted aggregation as a real run,
with the silos trained one after another in this process. Each line: a trainer spec
(JSON) and the mean +- std of the global accuracy after rounds 0..R over the seeds.

    python bench/lss_sweep.py --rounds 3 --seeds 0 1 2 \\
        '{"name": "fedavg", "epochs": 5, "lr": 0.003}' \\
        '{"name": "lss", "epochs_per_member": 2, "lr": 0.003, "lambda_a": 10, "lambda_d": 10}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lssfl.common.config import parse_config
from lssfl.common.data import materialize_embedded
from lssfl.common.models import build_model, evaluate
from lssfl.common.seeding import derive_seed
from lssfl.common.splits import load_split
from lssfl.server.aggregate import weighted_average
from lssfl.server.initial import initial_state
from lssfl.training.trainers import make_trainer

ROOT = Path(__file__).resolve().parent.parent


def run(spec: dict, seed: int, rounds: int, root: Path) -> list[float]:
    layout = materialize_embedded(root, 5, None, 0)
    test = load_split(layout.test_dir)
    silos = [load_split(layout.silo_dirs[f"silo-{i + 1}"]) for i in range(5)]
    # The start of a real run with configs/demo.yaml and this seed (cached under root).
    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    base["run"]["seed"] = seed
    base["data"]["root"] = str(root)
    cfg = parse_config(base)
    model = build_model(cfg.model_spec)
    model.load_state_dict(initial_state(cfg, layout.pretrain_dir))
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    accs = [evaluate(model, test.x, test.y)[0]]
    for r in range(1, rounds + 1):
        states = []
        for i, silo in enumerate(silos):
            model.load_state_dict(glob)
            s = derive_seed(seed, r, f"silo-{i + 1}")
            torch.manual_seed(s)
            make_trainer(spec).train(model, silo.x, silo.y, seed=s)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        glob = weighted_average(states, [s.num_samples for s in silos], glob)
        model.load_state_dict(glob)
        accs.append(evaluate(model, test.x, test.y)[0])
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="trainer specs as JSON")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=None, help="data folder (kept: a cache)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.root or Path(tempfile.mkdtemp()) / "embedded"
    for text in args.specs:
        spec, t0 = json.loads(text), time.monotonic()
        res = [run(spec, s, args.rounds, root) for s in args.seeds]
        mean = [statistics.fmean(a[r] for a in res) for r in range(args.rounds + 1)]
        std = [
            statistics.pstdev(a[r] for a in res)
            if len(res) < 2
            else statistics.stdev(a[r] for a in res)
            for r in range(args.rounds + 1)
        ]
        print(json.dumps({
            "spec": spec, "accuracy_mean": mean, "accuracy_std": std, "per_seed": res,
            "seconds": round(time.monotonic() - t0, 1),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
