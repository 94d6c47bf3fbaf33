"""``lssfl report``: the argparse front of the report package."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from lssfl.report import write_comparison, write_report
from lssfl.report.plots import PLOTS
from lssfl.report.runs import load_run
from lssfl.report.tables import comparison_lines

EPILOG = """\
examples:
  lssfl report runs/demo-20261125-010448
  lssfl report runs/demo-fedavg-20261125-1200 runs/demo-lss-20261125-1201 --out runs/cmp
  lssfl report runs/a runs/b --target 0.6

One run folder: report.html, the PNG plots, metrics.csv and report.md are written into it.
Several: an overlaid report (default folder runs/report-<time>) with a summary table
(final and best accuracy, MB in total and MB to reach the target accuracy)."""


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """The single run folder, or runs/report-<time> (a fresh name) for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0])
    base = Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to an ``lssfl`` subparsers object; returns its parser."""
    desc = ("Write report.html and PNG plots (accuracy per round and per MB, bytes per silo, "
            "time per round) for one run, or several runs overlaid.")  # fmt: skip
    p = subparsers.add_parser(
        "report",
        help="Write report.html and PNG plots for one run or several runs overlaid.",
        description=desc,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run folder holding metrics.jsonl")  # fmt: skip
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: the run folder for one run, runs/report-<time> for several)",
    )
    p.add_argument(
        "--target",
        type=float,
        help="accuracy for the 'MB to target' column (default for several runs: the best "
        "accuracy the weakest run reached)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """``lssfl report``: returns 0; ValueError (one line) for a missing or malformed run."""
    dirs = [Path(d) for d in args.run_dirs]
    runs = [load_run(d) for d in dirs]  # validate all before writing anything
    dirs = [r.path for r in runs]
    out = getattr(args, "out", None)
    target = getattr(args, "target", None)
    if len(dirs) == 1 and (out is None or Path(out).resolve() == dirs[0].resolve()):
        path = write_report(dirs[0], target=target)
    else:
        path = write_comparison(dirs, out or default_out_dir(dirs), target=target)
        print("accuracy and cumulative MB (down + up, all silos) per round:")
        print("\n".join(comparison_lines(runs)))
    print(f"report: {path}")
    for name, _ in PLOTS:
        print(f"  plot: {path.parent / name}")
    return 0
