"""Reports from run folders: per-round tables, report.md, report.html and PNG plots.

``write_report(run_dir)`` reports one run inside its folder (the launcher calls it after every
run). ``write_comparison(run_dirs, out_dir)`` overlays several runs (e.g. LSS against FedAvg on
the same data) in one report. ``lssfl report RUN_DIR [RUN_DIR ...]`` does either
(``lssfl.report.command``).

One concern per module: ``runs`` reads and checks metrics.jsonl and computes the figures,
``tables`` writes them as text (console lines, metrics.csv, report.md, summary.csv),
``plots`` draws the PNGs, ``page`` writes report.html, ``command`` is the argparse front.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lssfl.report.page import html_page
from lssfl.report.plots import write_plots
from lssfl.report.runs import (
    Run,
    default_target,
    enrolled_silos,
    label_runs,
    load_run,
    read_metrics,
    summarize,
    unique_sorted,
)
from lssfl.report.tables import write_run_tables, write_summary_csv


def resolve_target(runs: Sequence[Run], target: float | None) -> tuple[float | None, str]:
    """The target accuracy and how it was chosen; none for a single run without --target."""
    if target is not None:
        return target, "set with --target"
    if len(runs) > 1:
        return default_target(runs), "the best accuracy the weakest run reached"
    return None, ""  # one run: its own best accuracy would be a line to nowhere


def _write_html(runs: list[Run], out_dir: Path, title: str, target: float | None) -> Path:
    label_runs(runs)
    target, note = resolve_target(runs, target)
    sums = [summarize(run, target) for run in runs]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plots(runs, out_dir, target, note)
    path = out_dir / "report.html"
    path.write_text(html_page(title, runs, sums, target, note), encoding="utf-8")
    return path


def write_report(run_dir: Path, *, target: float | None = None) -> Path:
    """Write metrics.csv, report.md, report.html and the PNG plots into run_dir.

    Returns report.html's path (report.md's when the run recorded no rounds). Lenient about a
    missing metrics.jsonl (the launcher calls this after a failed run too); a malformed line
    raises ValueError.
    """
    run_dir = Path(run_dir)
    records = unique_sorted(read_metrics(run_dir))
    md = write_run_tables(run_dir, records)
    if not records:
        return md
    run = Run(run_dir, records, enrolled=enrolled_silos(run_dir))
    return _write_html([run], run_dir, f"lssfl run {run_dir.name}", target)


def write_comparison(
    run_dirs: Sequence[Path], out_dir: Path, *, target: float | None = None
) -> Path:
    """Overlay several runs in out_dir/report.html and PNGs; return the HTML's path.

    ValueError (one line, naming the file and line) when a run folder has no metrics.jsonl,
    a malformed line, or no rounds.
    """
    if not run_dirs:
        raise ValueError("no run folders given")
    runs = [load_run(Path(d)) for d in run_dirs]
    title = (
        "lssfl comparison: " + " vs ".join(dict.fromkeys(r.algorithm for r in runs))
        if len(runs) > 1
        else f"lssfl run {runs[0].name}"
    )
    path = _write_html(runs, Path(out_dir), title, target)
    write_summary_csv(runs, Path(out_dir) / "summary.csv", resolve_target(runs, target)[0])
    return path
