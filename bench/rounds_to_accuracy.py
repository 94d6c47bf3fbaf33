"""Accuracy per round for several local trainers through the real coordinator and silos.

Each arm (a trainer and its hyper-parameters) runs ``lssfl run`` as separate processes for
every seed, on the demo task (configs/demo.yaml: 5 silos, a pre-trained start with a fresh
head) in one of the regimes of ``bench/regimes.py`` (``generalist``: one domain per silo, a
start that knows them all; ``partial``: a start that knows two of five domains; ``label``:
Dirichlet(0.1) label shift in one domain). The script collects metrics.jsonl and writes a
table (JSON, Markdown) and a PNG plot under ``--out/REGIME``. Example:

    python bench/rounds_to_accuracy.py --regime partial --rounds 5 --seeds 0 1 2 --json

With ``--json`` it prints one object: ``{"arms": {NAME: {"accuracy": [[R0..R] per seed],
"cum_bytes": [[R0..R] per seed], "pool": ...}}, "table": ..., "paired": ...,
"bytes_to_target": ...}``; cum_bytes counts both directions, all silos, since round 0; "pool"
(LSS arms) summarises the silos' pool diagnostics over every silo-round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from regimes import REGIMES, apply_regime

from lssfl.training.lss_measures import ALIVE_SPREAD

ROOT = Path(__file__).resolve().parent.parent

# The paper's protocol: Adam 5e-4, batch 64; FedAvg-style baselines train 8 local epochs and
# LSS 4 members of 8 epochs (32 epochs of compute). fedavg-compute gives FedAvg the same 32
# epochs; fedavg-frozen trains only the fresh head for 32 epochs on the frozen start, the
# control for how much of LSS's gain is keeping the backbone near a good start. lss is
# lssfl's default (a linear probe of the head, then the pool without regularisers), lss-paper
# the paper's lambda = 3 without the probe.
PAPER = {"batch_size": 64, "lr": 0.0005}
LSS = {"name": "lss", **PAPER, "pool_size": 4, "epochs_per_member": 8}
INT8 = {"uplink": "int8", "downlink": "int8", "delta_downlink": True}
ARMS: dict[str, dict[str, Any]] = {
    "fedavg": {"trainer": {"name": "fedavg", **PAPER, "epochs": 8}},
    "fedavg-compute": {"trainer": {"name": "fedavg", **PAPER, "epochs": 32}},
    "fedavg-frozen": {"trainer": {"name": "fedavg", **PAPER, "epochs": 32, "head_only": True}},
    "fedprox": {"trainer": {"name": "fedprox", **PAPER, "epochs": 8, "mu": 0.01}},
    "swa": {"trainer": {"name": "swa", **PAPER, "epochs": 8, "swa_start": 0}},
    "lss": {"trainer": LSS},
    "lss-int8": {"trainer": LSS, "compression": INT8},
    "lss-paper": {"trainer": {**LSS, "name": "lss-paper"}},
}  # fmt: skip


def run_arm(base: dict, arm: str, seed: int, rounds: int, out: Path) -> list[dict]:
    """``lssfl run`` of ``arm`` on ``seed`` in its own processes; its metrics.jsonl records."""
    cfg = json.loads(json.dumps(base))
    cfg["run"].update({"name": f"{arm}-s{seed}", "seed": seed, "rounds": rounds})
    cfg["trainer"] = ARMS[arm]["trainer"]
    cfg["compression"] = ARMS[arm].get("compression", {})
    run_dir = out / "runs" / f"{arm}-s{seed}"
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    config = out / "configs" / f"{arm}-s{seed}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lssfl", "run", "--config", str(config), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed:\n{proc.stdout}\n{proc.stderr}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(
        f"{arm:8s} seed {seed}: "
        + " ".join(f"{r['global_accuracy']:.3f}" for r in records)
        + f"  ({time.monotonic() - t0:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return records


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(arms: dict[str, Any]) -> dict[str, Any]:
    """Per arm and round: mean and std of accuracy over the seeds, mean cumulative MB."""
    table: dict[str, Any] = {}
    for arm, data in arms.items():
        rounds = len(data["accuracy"][0])
        table[arm] = [
            {
                "round": r,
                "accuracy_mean": statistics.fmean(a[r] for a in data["accuracy"]),
                "accuracy_std": _sd([a[r] for a in data["accuracy"]]),
                "cumulative_mb": statistics.fmean(c[r] for c in data["cum_bytes"]) / 1e6,
                "seeds": len(data["accuracy"]),
            }
            for r in range(rounds)
        ]
    return table


def markdown(table: dict[str, Any]) -> str:
    """One row per arm: accuracy % mean (std) at each round, and the cumulative MB at the end."""
    rounds = len(next(iter(table.values())))
    head = (
        "| arm | "
        + " | ".join(f"R{r}" for r in range(rounds))
        + " | MB after R"
        + (f"{rounds - 1} |")
    )
    lines = [head, "|---|" + "---|" * (rounds + 1)]
    for arm, rows in table.items():
        cells = [f"{x['accuracy_mean'] * 100:.1f} ({x['accuracy_std'] * 100:.1f})" for x in rows]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {rows[-1]['cumulative_mb']:.2f} |")
    return "\n".join(lines)


def paired(arms: dict[str, Any], base: str = "fedavg") -> dict[str, Any]:
    """Per round, (arm - base) accuracy on each seed: the seeds share data and start model."""
    if base not in arms:
        return {}
    ref = arms[base]["accuracy"]
    out: dict[str, Any] = {}
    for arm, data in arms.items():
        if arm == base:
            continue
        rows = []
        for r in range(len(ref[0])):
            diffs = [a[r] - b[r] for a, b in zip(data["accuracy"], ref, strict=True)]
            rows.append(
                {"round": r, "per_seed": diffs, "diff_mean": statistics.fmean(diffs),
                 "diff_std": _sd(diffs)}
            )  # fmt: skip
        out[f"{arm} - {base}"] = rows
    return out


def pool_summary(by_seed: dict[int, list[dict]]) -> dict[str, Any] | None:
    """Over every silo-round of an LSS arm: how often the pool was alive (``pool_spread`` at
    least ALIVE_SPREAD), how often the soup's loss was no higher than its members' mean, and
    the mean of each diagnostic; None for an arm whose silos report no pool."""
    silos = [
        s
        for recs in by_seed.values()
        for rec in recs
        for s in rec.get("silos", [])
        if isinstance(s.get("train_pool_spread"), int | float)
    ]
    if not silos:
        return None
    keys = ("pool_spread", "pool_disagreement", "soup_loss", "member_loss",
            "min_member_distance", "distance_to_global", "reg_to_loss_grad")  # fmt: skip
    return {
        "silo_rounds": len(silos),
        "alive_fraction": sum(s["train_pool_spread"] >= ALIVE_SPREAD for s in silos) / len(silos),
        "soup_not_worse_fraction": sum(
            s["train_soup_loss"] <= s["train_member_loss"] for s in silos
        )
        / len(silos),
        **{
            f"mean_{k}": statistics.fmean(s[f"train_{k}"] for s in silos)
            for k in keys
            if all(isinstance(s.get(f"train_{k}"), int | float) for s in silos)
        },
    }


def arms_json(results: dict[str, dict[int, list[dict]]]) -> dict[str, Any]:
    """Per arm, per seed: accuracy and cumulative bytes (down + up, all silos) at R0..R, and
    the pool's summary for LSS arms."""
    out = {}
    for arm, by_seed in results.items():
        out[arm] = {
            "seeds": list(by_seed),
            "accuracy": [[r["global_accuracy"] for r in recs] for recs in by_seed.values()],
            "cum_bytes": [
                [r["cum_bytes_down"] + r["cum_bytes_up"] for r in recs] for recs in by_seed.values()
            ],
            "pool": pool_summary(by_seed),
        }
    return out


def bytes_to_target(arms: dict[str, Any], base: str = "fedavg") -> dict[str, Any]:
    """Per arm, per seed: cumulative bytes at the first round that reaches ``base``'s last-round
    accuracy on the same seed (None where it never does), and the ratio to ``base``'s bytes."""
    if base not in arms:
        return {}
    targets = [acc[-1] for acc in arms[base]["accuracy"]]
    base_bytes = [cum[-1] for cum in arms[base]["cum_bytes"]]
    out: dict[str, Any] = {}
    for arm, data in arms.items():
        per_seed = []
        for acc, cum, target, ref in zip(
            data["accuracy"], data["cum_bytes"], targets, base_bytes, strict=True
        ):
            hit = next((r for r, a in enumerate(acc) if a >= target), None)
            per_seed.append(
                {"round": hit, "bytes": None if hit is None else cum[hit],
                 "ratio": None if hit is None else cum[hit] / ref}
            )  # fmt: skip
        ratios = [p["ratio"] for p in per_seed]
        out[arm] = {
            "target_accuracy": targets,
            "per_seed": per_seed,
            "max_ratio": None if None in ratios else max(ratios),
        }
    return out


def plot(table: dict[str, Any], path: Path, regime: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for arm, rows in table.items():
        x = [r["round"] for r in rows]
        m = [r["accuracy_mean"] * 100 for r in rows]
        s = [r["accuracy_std"] * 100 for r in rows]
        ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=arm)
    ax.set_xlabel("communication round (0 = pre-trained start)")
    ax.set_ylabel("global test accuracy (%)")
    ax.set_title(f"Embedded digits, 5 silos, regime {regime!r}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--regime", default="generalist", choices=list(REGIMES))
    parser.add_argument(
        "--model",
        default=None,
        help="a model name instead of the config's (e.g. resnet18: the paper's size)",
    )
    parser.add_argument(
        "--pretrain-epochs", type=int, default=None, help="with --model: epochs of pre-training"
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rounds")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument(
        "--from-json", type=Path, help="render the table and plot from this JSON; run nothing"
    )
    args = parser.parse_args()

    out = args.out / (args.regime if not args.model else f"{args.regime}-{args.model}")
    if args.from_json:  # render again from an earlier run's JSON, running nothing
        arms = json.loads(args.from_json.read_text())["arms"]
    else:
        base = apply_regime(yaml.safe_load(args.config.read_text()), args.regime)
        if args.model:
            base["model"] = {**base["model"], "name": args.model, "kwargs": {"num_classes": 10}}
            if args.pretrain_epochs is not None:
                base["model"]["pretrain_epochs"] = args.pretrain_epochs
            # A CPU round of a large model takes minutes: no silo may miss it for being slow.
            base["coordinator"]["round_deadline_s"] = 3600
        out.mkdir(parents=True, exist_ok=True)
        results = {
            arm: {s: run_arm(base, arm, s, args.rounds, out) for s in args.seeds}
            for arm in args.arms
        }
        arms = arms_json(results)
    table = summarise(arms)
    diffs = paired(arms)
    reach = bytes_to_target(arms)
    text = (
        markdown(table)
        + "\n\nPaired by seed against fedavg (accuracy points; mean (std), then each seed):\n"
        + "\n".join(
            f"- {name}: "
            + "; ".join(
                f"R{d['round']} {d['diff_mean'] * 100:+.1f} ({d['diff_std'] * 100:.1f}) ["
                + ", ".join(f"{x * 100:+.1f}" for x in d["per_seed"])
                + "]"
                for d in rows[1:]
            )  # fmt: skip
            for name, rows in diffs.items()
        )
        + "\n\nBytes to reach fedavg's last-round accuracy (per seed: round, MB, x fedavg's):\n"
        + "\n".join(
            f"- {arm}: "
            + ", ".join(
                "never"
                if p["round"] is None
                else f"R{p['round']} {p['bytes'] / 1e6:.2f} MB ({p['ratio']:.3f}x)"
                for p in r["per_seed"]
            )  # fmt: skip
            for arm, r in reach.items()
        )
        + "\n\nThe pool over every silo-round (alive: pool_spread >= "
        + f"{ALIVE_SPREAD}; soup not worse: its loss <= its members' mean, on the silo's data):\n"
        + "\n".join(
            f"- {arm}: alive {p['alive_fraction'] * 100:.0f} %, soup not worse "
            f"{p['soup_not_worse_fraction'] * 100:.0f} % of {p['silo_rounds']}; mean spread "
            f"{p.get('mean_pool_spread', float('nan')):.3f}, disagreement "
            f"{p.get('mean_pool_disagreement', float('nan')) * 100:.1f} %"
            for arm, data in arms.items()
            if (p := data.get("pool"))
        )
    )
    report = {
        "regime": args.regime,
        "arms": arms,
        "table": table,
        "paired": diffs,
        "bytes_to_target": reach,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds_to_accuracy.json").write_text(json.dumps(report, indent=2))
    (out / "rounds_to_accuracy.md").write_text(text + "\n")
    plot(table, out / "rounds_to_accuracy.png", args.regime)
    print(json.dumps(report) if args.json else text)


if __name__ == "__main__":
    main()
