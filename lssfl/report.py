"""Per-round table and a small report from a run folder's metrics.jsonl."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = ("round", "accuracy", "loss", "MB down", "MB up", "seconds", "silos", "missing")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row(rec: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(rec["round"]),
        f"{rec['global_accuracy']:.4f}",
        f"{rec['global_loss']:.4f}",
        f"{rec['bytes_down'] / 1e6:.3f}",
        f"{rec['bytes_up'] / 1e6:.3f}",
        f"{rec['wall_seconds']:.1f}",
        str(rec.get("num_results", 0)),
        ",".join(rec.get("missing", [])) or "-",
    )


def format_line(cells: tuple[str, ...]) -> str:
    widths = (5, 8, 8, 9, 9, 8, 5, 0)
    return "  ".join(c.rjust(w) if w else c for c, w in zip(cells, widths, strict=True))


def write_report(run_dir: Path) -> Path:
    """Write metrics.csv and report.md; return the report's path."""
    records = read_metrics(run_dir)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(row(r) for r in records)
    lines = [f"# Run {run_dir.name}", ""]
    if records:
        first, last = records[0], records[-1]
        total_down = sum(r["bytes_down"] for r in records)
        total_up = sum(r["bytes_up"] for r in records)
        lines += [
            f"- algorithm: {last['algorithm']}",
            f"- rounds: {last['round']}",
            f"- global accuracy: {first['global_accuracy']:.4f} (round 0, initial model) -> "
            f"{last['global_accuracy']:.4f} (round {last['round']})",
            f"- bytes: {total_down / 1e6:.3f} MB down, {total_up / 1e6:.3f} MB up in total",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
            *("| " + " | ".join(row(r)) + " |" for r in records),
            "",
            "Per silo (bytes down / up, train seconds) in metrics.jsonl; "
            "models in checkpoints/ and final_model.safetensors.",
        ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
