"""Cost of one LSS step against one FedAvg step on the same model and batch.

    python bench/lss_step.py --model resnet18 [--device cuda] [--batch 64] [--size 32] [--json]

FedAvg step: forward, backward and Adam step (``trainers.local_step``, what FedAvgTrainer
runs). LSS step: ``LSSTrainer.step`` with a pool of 4 whose last member is active (members 1-3
are stand-ins near f_p: the cost does not depend on their values), default options. Times are
medians over interleaved repeats after warm-up, in this process. Peak memory comes from one
child process per variant (this script with ``--variant``): peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA; both include the model, the optimizer state and
(for LSS) the pool.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from lssfl.common.models import build_model
from lssfl.training.loop import LocalSteps, local_step
from lssfl.training.lss import LSSTrainer, sample_alphas

POOL_SIZE = 4


def _setup(args: argparse.Namespace, variant: str) -> tuple[Callable[[], object], int]:
    """Build the model and batch for ``variant``; return (one step, parameter count)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model({"name": args.model}).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    count = sum(p.numel() for p in model.parameters())
    model.train()
    if variant == "fedavg":
        opt = LocalSteps(lr=1e-3).make_optimizer(model.parameters())
        return (lambda: local_step(model, opt, x, y)), count

    trainer = LSSTrainer(pool_size=POOL_SIZE, batch_size=args.batch)
    state = trainer.prepare(model, x, y)
    for _ in range(POOL_SIZE - 1):  # stand-in members, so that every distance is non-zero
        trainer.start_member(state)
        with torch.no_grad():
            noise = torch.randn(state.layout.dim, generator=g).to(device)
            state.pool.active.add_(noise, alpha=1e-3)
        state.pool.finish_member()
    opt = trainer.start_member(state)
    alpha_generator = torch.Generator().manual_seed(0)

    def step() -> object:
        alphas = sample_alphas(POOL_SIZE, trainer.interp_samples, alpha_generator)
        return trainer.step(model, state, opt, x, y, alphas)

    return step, count


def _timed(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _child_peak(args: argparse.Namespace, variant: str) -> dict[str, float]:
    """Peak memory of ``variant`` alone in a fresh process, and its peak before the setup."""
    argv = [sys.executable, __file__, "--model", args.model, "--device", args.device]
    argv += ["--batch", str(args.batch), "--size", str(args.size), "--variant", variant]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "resnet18"], default="cnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--variant", choices=["fedavg", "lss"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.variant:  # child: a few steps, then report the peak
        before = _peak_mb(device)
        step, _ = _setup(args, args.variant)
        for _ in range(3):
            step()
        print(json.dumps({"peak_mb": _peak_mb(device), "before_mb": before}))
        return

    # Children first: Linux carries a parent's peak RSS over into its child's ru_maxrss
    # (across fork and exec), so they must start while this process is still small.
    peaks = {variant: _child_peak(args, variant) for variant in ("fedavg", "lss")}
    fedavg, count = _setup(args, "fedavg")
    lss, _ = _setup(args, "lss")
    for _ in range(args.warmup):
        fedavg()
        lss()
    times: dict[str, list[float]] = {"fedavg": [], "lss": []}
    for _ in range(args.repeats):  # interleaved, so that background load hits both alike
        times["fedavg"].append(_timed(fedavg, device))
        times["lss"].append(_timed(lss, device))
    fedavg_ms = statistics.median(times["fedavg"])
    lss_ms = statistics.median(times["lss"])
    result = {
        "model": args.model,
        "device": str(device),
        "params": count,
        "batch": args.batch,
        "size": args.size,
        "threads": torch.get_num_threads(),
        "fedavg_step_ms": round(fedavg_ms, 2),
        "lss_step_ms": round(lss_ms, 2),
        "ratio": round(lss_ms / fedavg_ms, 3),
        "fedavg_peak_mb": round(peaks["fedavg"]["peak_mb"], 1),
        "lss_peak_mb": round(peaks["lss"]["peak_mb"], 1),
        # what the process held before building anything (on CPU: mostly torch's libraries)
        "before_setup_mb": round(peaks["fedavg"]["before_mb"], 1),
    }
    result["peak_ratio"] = round(result["lss_peak_mb"] / result["fedavg_peak_mb"], 3)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")


if __name__ == "__main__":
    main()
