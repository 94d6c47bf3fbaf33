"""The per-round table as text: console lines (the launcher), metrics.csv, report.md and
the comparison's summary.csv."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lssfl.common.records import RoundRecord
from lssfl.report.runs import Run, is_num, summarize

COLUMNS = ("round", "accuracy", "loss", "MB down", "MB up", "seconds", "silos", "missing")


def fmt(v: Any, spec: str) -> str:
    """``v`` formatted with ``spec``, or '-' when not a number."""
    return format(v, spec) if is_num(v) and not math.isnan(v) else "-"


def row(rec: RoundRecord) -> tuple[str, ...]:
    """A round's cells in COLUMNS order, as text."""
    return (
        str(rec.round),
        fmt(rec.global_accuracy, ".4f"),
        fmt(rec.global_loss, ".4f"),
        f"{rec.bytes_down / 1e6:.3f}",
        f"{rec.bytes_up / 1e6:.3f}",
        f"{rec.wall_seconds:.1f}",
        str(rec.num_results),
        ",".join(map(str, rec.missing)) or "-",
    )


def format_line(cells: tuple[str, ...]) -> str:
    """The cells as one aligned console line."""
    widths = (5, 8, 8, 9, 9, 8, 5, 0)
    return "  ".join(c.rjust(w) if w else c for c, w in zip(cells, widths, strict=True))


def write_run_tables(run_dir: Path, records: Sequence[RoundRecord]) -> Path:
    """Write metrics.csv and report.md for one run into run_dir; return report.md's path."""
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(row(r) for r in records)
    lines = [f"# Run {run_dir.name}", ""]
    if records:
        first, last = records[0], records[-1]
        total_down = sum(r.bytes_down for r in records)
        total_up = sum(r.bytes_up for r in records)
        lines += [
            f"- algorithm: {last.algorithm}",
            f"- rounds: {last.round}",
            f"- global accuracy: {fmt(first.global_accuracy, '.4f')} "
            f"(round {first.round}{', initial model' if first.round == 0 else ''}) -> "
            f"{fmt(last.global_accuracy, '.4f')} (round {last.round})",
            f"- bytes: {total_down / 1e6:.3f} MB down, {total_up / 1e6:.3f} MB up in total",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
            *("| " + " | ".join(row(r)) + " |" for r in records),
            "",
            "Plots and per-silo bytes in report.html; per silo details in metrics.jsonl; "
            "models in checkpoints/ and final_model.safetensors.",
        ]
    else:
        lines.append("No rounds recorded (metrics.jsonl is missing or empty).")
    md = run_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def write_summary_csv(runs: Sequence[Run], path: Path, target: float | None) -> Path:
    """One row per run: final and best accuracy, MB, and the MB and round to reach target."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([
            "run", "algorithm", "rounds", "final_accuracy", "best_accuracy", "best_round",
            "mb_total", "mb_down", "mb_up", "target", "mb_to_target", "rounds_to_target",
        ])  # fmt: skip
        for run in runs:
            s = summarize(run, target)
            reached = math.isnan(s.target) or s.mb_to_target is not None
            writer.writerow([
                str(run.path), s.algorithm, s.rounds, fmt(s.final_accuracy, ".4f"),
                fmt(s.best_accuracy, ".4f"), s.best_round, f"{s.mb_total:.3f}",
                f"{s.mb_down:.3f}", f"{s.mb_up:.3f}", fmt(s.target, ".4f"),
                fmt(s.mb_to_target, ".3f") if reached else "not reached",
                fmt(s.rounds_to_target, "d") if reached else "not reached",
            ])  # fmt: skip
    return path


def comparison_lines(runs: Sequence[Run]) -> list[str]:
    """Accuracy and cumulative MB per round, one column per run, and each run's gain over the
    first: what a comparison shows at a glance in a terminal."""
    names = [r.algorithm for r in runs]
    gains = [f"{n} - {names[0]}" for n in names[1:]]
    widths = [max(21, len(n) + 2) for n in names] + [max(12, len(g) + 2) for g in gains]
    head = "round" + "".join(f"{t:>{w}}" for t, w in zip(names + gains, widths, strict=True))
    lines = [head]
    tables = [
        dict(zip(run.rounds, zip(run.accuracy, run.cumulative_mb, strict=True), strict=True))
        for run in runs
    ]
    for rnd in sorted({r for run in runs for r in run.rounds}):
        cells = [(t.get(rnd) or (math.nan, math.nan)) for t in tables]
        row = f"{rnd:>5}" + "".join(
            f"{fmt(acc, '.4f') + ' ' + fmt(mb, '7.2f') + ' MB':>{w}}"
            for (acc, mb), w in zip(cells, widths, strict=False)
        )
        row += "".join(
            f"{fmt((acc - cells[0][0]) * 100, '+.2f') + ' pts':>{w}}"
            for (acc, _), w in zip(cells[1:], widths[len(runs) :], strict=True)
        )
        lines.append(row)
    return lines
