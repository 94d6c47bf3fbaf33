"""Reports from run folders: per-round tables, report.md, report.html and PNG plots.

``write_report(run_dir)`` reports one run inside its folder (the launcher calls it after every
run). ``write_comparison(run_dirs, out_dir)`` overlays several runs (e.g. LSS against FedAvg on
the same data) in one report. ``lssfl report RUN_DIR [RUN_DIR ...]`` does either (``register``
and ``run`` below).

report.html is one HTML file without JavaScript; the plots are PNG files in the same folder,
referenced by relative path, so the folder can be moved or zipped as a whole. Plots are drawn
with Matplotlib's Agg canvas (no display, no pyplot state).

Time per round is split as: training = the *slowest* answering silo's ``train_seconds`` (the
round waits for it), communication + waiting = ``wall_seconds`` - training (transfers, queueing,
aggregation and evaluation on the coordinator, and waiting for late or missing silos).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = ("round", "accuracy", "loss", "MB down", "MB up", "seconds", "silos", "missing")

PLOTS = (
    ("accuracy_per_round.png", "Accuracy per round"),
    ("accuracy_vs_mb.png", "Accuracy against cumulative communication"),
    ("bytes_per_silo.png", "Bytes per silo per round"),
    ("time_per_round.png", "Time per round: training and communication"),
)
RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
TRAIN_COLOR, COMM_COLOR = "#4c72b0", "#f2a154"
EPILOG = """\
examples:
  lssfl report runs/demo-20261125-010448
  lssfl report runs/demo-fedavg-20261125-1200 runs/demo-lss-20261125-1201 --out runs/cmp
  lssfl report runs/a runs/b --target 0.6

One run folder: report.html, the PNG plots, metrics.csv and report.md are written into it.
Several: an overlaid report (default folder runs/report-<time>) with a summary table
(final and best accuracy, MB in total and MB to reach the target accuracy)."""


# ----------------------------------------------------------------- reading


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_record(rec: Any) -> str | None:
    """What is wrong with one metrics.jsonl object, or None. Unknown keys are fine."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    r = rec.get("round")
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        return f"'round' must be an integer >= 0, got {r!r}"
    for key in ("global_accuracy", "global_loss", "wall_seconds", "bytes_down", "bytes_up"):
        v = rec.get(key)
        if v is not None and not _is_num(v):
            return f"'{key}' must be a number, got {v!r}"
    silos = rec.get("silos", [])
    if not isinstance(silos, list) or not all(isinstance(s, dict) for s in silos):
        return "'silos' must be a list of objects"
    for s in silos:
        for key in ("bytes_down", "bytes_up", "train_seconds"):
            v = s.get(key)
            if v is not None and not _is_num(v):
                return f"silo {s.get('silo_id')!r}: '{key}' must be a number, got {v!r}"
    missing = rec.get("missing", [])
    if not isinstance(missing, list):
        return f"'missing' must be a list, got {missing!r}"
    return None


def read_metrics(run_dir: Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` in file order.

    Not strict (the launcher polls a running run): a missing file gives [] and an unfinished
    last line (no newline yet) is skipped. Strict: both raise ValueError. A malformed complete
    line always raises ValueError naming the file and line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        if strict:
            raise ValueError(f"{path}: no such file (is {run_dir} a run folder?)")
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) and not strict:  # the last line, still being written
                break
            raise ValueError(
                f"{path}:{i}: not valid JSON ({exc.msg}, column {exc.colno})"
            ) from None
        problem = _check_record(rec)
        if problem:
            raise ValueError(f"{path}:{i}: {problem}")
        records.append(rec)
    return records


# ----------------------------------------------------------------- per-round values


def _num(d: dict[str, Any], key: str) -> float:
    v = d.get(key)
    return float(v) if _is_num(v) else 0.0


def _accuracy(rec: dict[str, Any]) -> float:
    v = rec.get("global_accuracy")
    return float(v) if _is_num(v) else math.nan


def _mb(rec: dict[str, Any]) -> float:
    """MB down + up of a round (serialized messages, all silos)."""
    return (_num(rec, "bytes_down") + _num(rec, "bytes_up")) / 1e6


def _train_seconds(rec: dict[str, Any]) -> float | None:
    """The slowest answering silo's training time in this round (None: nobody trained)."""
    times = [float(s["train_seconds"]) for s in rec.get("silos", [])
             if _is_num(s.get("train_seconds"))]  # fmt: skip
    return max(times) if times else None


def _comm_seconds(rec: dict[str, Any]) -> float:
    return max(0.0, _num(rec, "wall_seconds") - (_train_seconds(rec) or 0.0))


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if _is_num(v) and not math.isnan(v) else "-"


def row(rec: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(rec["round"]),
        _fmt(rec.get("global_accuracy"), ".4f"),
        _fmt(rec.get("global_loss"), ".4f"),
        f"{_num(rec, 'bytes_down') / 1e6:.3f}",
        f"{_num(rec, 'bytes_up') / 1e6:.3f}",
        f"{_num(rec, 'wall_seconds'):.1f}",
        str(rec.get("num_results", 0)),
        ",".join(map(str, rec.get("missing") or [])) or "-",
    )


def format_line(cells: tuple[str, ...]) -> str:
    widths = (5, 8, 8, 9, 9, 8, 5, 0)
    return "  ".join(c.rjust(w) if w else c for c, w in zip(cells, widths, strict=True))


# ----------------------------------------------------------------- runs and summaries


@dataclass
class Run:
    path: Path
    records: list[dict[str, Any]]  # one per round, sorted, unique
    label: str = ""
    color: str = RUN_COLORS[0]

    @property
    def name(self) -> str:
        return self.path.name or self.path.resolve().name

    @property
    def algorithm(self) -> str:
        algos = [r["algorithm"] for r in self.records if r.get("algorithm")]
        return str(algos[-1]) if algos else "?"

    @property
    def rounds(self) -> list[int]:
        return [r["round"] for r in self.records]

    @property
    def accuracy(self) -> list[float]:
        return [_accuracy(r) for r in self.records]

    @property
    def cumulative_mb(self) -> list[float]:
        out, total = [], 0.0
        for r in self.records:
            total += _mb(r)
            out.append(total)
        return out

    @property
    def trained(self) -> list[dict[str, Any]]:
        """Federated rounds (round 0, the initial model, left out)."""
        return [r for r in self.records if r["round"] > 0]

    def silo_ids(self) -> list[str]:
        ids: set[str] = set()
        for r in self.records:
            ids.update(str(s.get("silo_id")) for s in r.get("silos", []))
        return sorted(ids, key=_natural)


def _unique_sorted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_round = {r["round"]: r for r in records}  # a repeated round: the later line wins
    return [by_round[k] for k in sorted(by_round)]


def load_run(run_dir: Path) -> Run:
    """A run folder's metrics, strictly: ValueError when missing, malformed or empty."""
    run_dir = Path(run_dir)
    if run_dir.name == "metrics.jsonl" and run_dir.is_file():
        run_dir = run_dir.parent
    records = read_metrics(run_dir, strict=True)
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no rounds recorded")
    return Run(run_dir, _unique_sorted(records))


def _label_runs(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for i, run in enumerate(runs):
        label = f"{run.algorithm} ({run.name})"
        seen[label] = seen.get(label, 0) + 1
        run.label = label if seen[label] == 1 else f"{label} #{seen[label]}"
        run.color = RUN_COLORS[i % len(RUN_COLORS)]


@dataclass
class Summary:
    label: str
    algorithm: str
    run: str
    rounds: int
    initial_accuracy: float
    final_accuracy: float
    best_accuracy: float
    best_round: int
    mb_down: float
    mb_up: float
    mb_total: float
    mb_fp32: float  # what the tensors would weigh as uncompressed fp32, down + up
    seconds: float  # wall time of the federated rounds (round 0 left out)
    missing_answers: int  # (round, silo) pairs selected but not answered
    target: float = math.nan
    mb_to_target: float | None = None
    rounds_to_target: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(run: Run, target: float | None = None) -> Summary:
    acc = run.accuracy
    valid = [(a, r) for a, r in zip(acc, run.rounds, strict=True) if not math.isnan(a)]
    best, best_round = max(valid, key=lambda t: (t[0], -t[1])) if valid else (math.nan, 0)
    first = run.records[0]
    s = Summary(
        label=run.label or run.name,
        algorithm=run.algorithm,
        run=run.name,
        rounds=run.rounds[-1],
        initial_accuracy=_accuracy(first) if first["round"] == 0 else math.nan,
        final_accuracy=acc[-1],
        best_accuracy=best,
        best_round=best_round,
        mb_down=sum(_num(r, "bytes_down") for r in run.records) / 1e6,
        mb_up=sum(_num(r, "bytes_up") for r in run.records) / 1e6,
        mb_total=run.cumulative_mb[-1],
        mb_fp32=sum(_num(r, "bytes_down_raw") + _num(r, "bytes_up_raw") for r in run.records) / 1e6,
        seconds=sum(_num(r, "wall_seconds") for r in run.trained),
        missing_answers=sum(len(r.get("missing") or []) for r in run.records),
    )
    if target is not None and not math.isnan(target):
        s.target = target
        for r, a, mb in zip(run.rounds, acc, run.cumulative_mb, strict=True):
            if a >= target - 1e-12:
                s.mb_to_target, s.rounds_to_target = mb, r
                break
    return s


def default_target(runs: Sequence[Run]) -> float:
    """The best accuracy the weakest run reached: every run reaches it at some round."""
    bests = [summarize(r).best_accuracy for r in runs]
    bests = [b for b in bests if not math.isnan(b)]
    return min(bests) if bests else math.nan


# ----------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, facecolor="white")
    return path


def _style(ax) -> None:
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _target_line(ax, target: float | None, note: str) -> None:
    if target is not None and not math.isnan(target):
        ax.axhline(target, color="0.4", ls=":", lw=1.2, label=f"target {target:.4f} ({note})")


def _not_aggregated(ax, x: list[float], runs_recs: list[dict[str, Any]], acc, color) -> bool:
    pts = [(xi, a) for xi, r, a in zip(x, runs_recs, acc, strict=True)
           if r.get("status") not in (None, "ok", "initial")]  # fmt: skip
    if pts:
        ax.scatter(*zip(*pts, strict=True), s=90, facecolors="none", edgecolors=color, lw=1.5,
                   zorder=5)  # fmt: skip
    return bool(pts)


def _marker_legend(ax, flagged: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if flagged:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="none", marker="o", mfc="none", mec="0.3", ms=9))
        labels.append("round not aggregated (too few silos)")
    ax.legend(handles, labels, loc="best", fontsize=9, framealpha=0.9)


def _acc_limits(ax, runs: Sequence[Run], target: float | None) -> None:
    vals = [a for run in runs for a in run.accuracy if not math.isnan(a)]
    if target is not None and not math.isnan(target):
        vals.append(target)
    if vals:
        lo, hi = min(vals), max(vals)
        pad = max(0.02, 0.08 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi < 1 else 1.01)


def plot_accuracy(runs: Sequence[Run], path: Path, target=None, target_note="") -> Path:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    flagged = False
    for run in runs:
        ax.plot(run.rounds, run.accuracy, marker="o", ms=5, lw=2, color=run.color,
                label=run.label)  # fmt: skip
        flagged |= _not_aggregated(ax, run.rounds, run.records, run.accuracy, run.color)
    _target_line(ax, target, target_note)
    ax.set_title("Global model test accuracy per round (round 0 = initial model)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (fraction correct)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _acc_limits(ax, runs, target)
    _style(ax)
    _marker_legend(ax, flagged)
    return _save(fig, path)


def plot_accuracy_vs_mb(runs: Sequence[Run], path: Path, target=None, target_note="") -> Path:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    flagged = False
    for run in runs:
        x = run.cumulative_mb
        ax.plot(x, run.accuracy, marker="o", ms=5, lw=2, color=run.color, label=run.label)
        flagged |= _not_aggregated(ax, x, run.records, run.accuracy, run.color)
        if len(x) <= 12:
            for r, xi, a in zip(run.rounds, x, run.accuracy, strict=True):
                if not math.isnan(a):
                    ax.annotate(f"r{r}", (xi, a), textcoords="offset points", xytext=(4, -11),
                                fontsize=8, color=run.color)  # fmt: skip
    _target_line(ax, target, target_note)
    ax.set_title("Accuracy against communication (rN: after round N)")
    ax.set_xlabel("cumulative communication, MB (down + up, all silos)")
    ax.set_ylabel("test accuracy (fraction correct)")
    ax.set_xlim(left=0)
    _acc_limits(ax, runs, target)
    _style(ax)
    _marker_legend(ax, flagged)
    return _save(fig, path)


def _round_ticks(ax, runs: Sequence[Run]) -> None:
    rounds = sorted({r["round"] for run in runs for r in run.trained})
    if 0 < len(rounds) <= 20:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


MAX_BARS = 60  # bars per panel in the bytes plot; beyond that a heat map reads better


def _silo_grid(run: Run, silos: list[str]):
    """MB (down + up) and 'no model back' flags, silos x federated rounds (NaN: not listed)."""
    import numpy as np

    rounds = [r["round"] for r in run.trained]
    mb = np.full((len(silos), len(rounds)), np.nan)
    bad = np.zeros(mb.shape, dtype=bool)
    index = {s: i for i, s in enumerate(silos)}
    for j, rec in enumerate(run.trained):
        for s in rec.get("silos", []):
            i = index[str(s.get("silo_id"))]
            mb[i, j] = (_num(s, "bytes_down") + _num(s, "bytes_up")) / 1e6
            bad[i, j] = s.get("status") not in ("ok", None)
    return rounds, mb, bad


def _bytes_heatmap(runs: Sequence[Run], silos: list[str], path: Path) -> Path:
    import numpy as np

    grids = [_silo_grid(run, silos) for run in runs]
    values = np.concatenate([g[1].ravel() for g in grids]) if grids else np.array([])
    vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    fig = _figure(8, 1.4 + (0.9 + 0.22 * len(silos)) * len(runs))
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
    image = None
    for ax, run, (rounds, mb, bad) in zip(axes, runs, grids, strict=True):
        if rounds:
            extent = (rounds[0] - 0.5, rounds[-1] + 0.5, len(silos) - 0.5, -0.5)
            image = ax.imshow(mb, aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                              extent=extent, interpolation="nearest")  # fmt: skip
            ys, xs = np.nonzero(bad)
            if len(xs):
                ax.scatter(np.array(rounds)[xs], ys, marker="x", color="#d62728", s=30, lw=1.5,
                           label="no model back (missing / idle)")  # fmt: skip
                ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
        ax.set_yticks(range(len(silos)), silos, fontsize=8 if len(silos) > 12 else 9)
        ax.set_title(run.label, fontsize=10, loc="left")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("round")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="MB per silo and round (down + up)")
    fig.suptitle("Bytes per silo per round (serialized gRPC messages, model down + update up)")
    return _save(fig, path)


def plot_bytes_per_silo(runs: Sequence[Run], path: Path) -> Path:
    from matplotlib.patches import Patch

    silos = sorted({s for run in runs for s in run.silo_ids()}, key=_natural)
    if len(silos) * max((len(run.trained) for run in runs), default=0) > MAX_BARS:
        return _bytes_heatmap(runs, silos, path)
    labelled: set[str] = set()
    cmap_colors = _silo_colors(len(silos))
    fig = _figure(8, 1.2 + 2.9 * len(runs))
    axes = fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    any_missing = False
    width = 0.8 / max(1, len(silos))
    for ax, run in zip(axes, runs, strict=True):
        for j, silo in enumerate(silos):
            xs, hs, miss = [], [], []
            for rec in run.trained:
                s = next((s for s in rec.get("silos", []) if str(s.get("silo_id")) == silo), None)
                if s is None:
                    continue
                xs.append(rec["round"] - 0.4 + width * (j + 0.5))
                hs.append((_num(s, "bytes_down") + _num(s, "bytes_up")) / 1e6)
                miss.append(s.get("status") not in ("ok", None))
            if not xs:
                continue
            color = cmap_colors[j]
            bars = ax.bar(xs, hs, width=width * 0.92, color=color,
                          label=None if silo in labelled else silo)  # fmt: skip
            labelled.add(silo)
            for bar, m in zip(bars, miss, strict=True):
                if m:
                    any_missing = True
                    bar.set_facecolor("white")
                    bar.set_edgecolor(color)
                    bar.set_hatch("///")
        ax.set_title(run.label, fontsize=10, loc="left")
        ax.set_ylabel("MB (down + up)")
        _style(ax)
        ax.grid(False, axis="x")
    _round_ticks(axes[-1], runs)
    axes[-1].set_xlabel("round")
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if any_missing:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///"))
        labels.append("missing / idle (no model back)")
    fig.suptitle("Bytes per silo per round (serialized gRPC messages, model down + update up)")
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(6, len(handles)),
                   fontsize=9)  # fmt: skip
    return _save(fig, path)


def _natural(text: str) -> list[Any]:
    """Sort key: silo-2 before silo-10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _silo_colors(n: int) -> list[str]:
    from matplotlib import colormaps

    if n <= 8:  # not tab10: those colours mark the runs in the other plots
        return [colormaps["Dark2"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def plot_time(runs: Sequence[Run], path: Path) -> Path:
    fig = _figure(8, 1.2 + 2.7 * len(runs))
    axes = fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, run in zip(axes, runs, strict=True):
        recs = run.trained
        x = [r["round"] for r in recs]
        train = [_train_seconds(r) or 0.0 for r in recs]
        comm = [_comm_seconds(r) for r in recs]
        ax.bar(x, train, width=0.6, color=TRAIN_COLOR,
               label="training (slowest silo)" if ax is axes[0] else None)  # fmt: skip
        ax.bar(
            x,
            comm,
            width=0.6,
            bottom=train,
            color=COMM_COLOR,
            label="communication + waiting (rest of the round)" if ax is axes[0] else None,
        )
        ax.set_title(run.label, fontsize=10, loc="left")
        ax.set_ylabel("seconds")
        _style(ax)
        ax.grid(False, axis="x")
    _round_ticks(axes[-1], runs)
    axes[-1].set_xlabel("round")
    fig.suptitle("Wall time per round: training vs communication and waiting")
    if any(run.trained for run in runs):
        fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    return _save(fig, path)


def write_plots(runs: Sequence[Run], out_dir: Path, target=None, target_note="") -> list[Path]:
    names = [name for name, _ in PLOTS]
    return [
        plot_accuracy(runs, out_dir / names[0], target, target_note),
        plot_accuracy_vs_mb(runs, out_dir / names[1], target, target_note),
        plot_bytes_per_silo(runs, out_dir / names[2]),
        plot_time(runs, out_dir / names[3]),
    ]


# ----------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid
#ddd; padding-bottom: .2em; } h3 { margin-bottom: .3em; }
.meta, figcaption, .note { color: #555; font-size: .9em; }
ul.meta { margin-top: 0; padding-left: 1.2em; list-style: none; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; white-space: nowrap; }
th { background: #f3f5f8; white-space: normal; vertical-align: bottom; }
td.l, th.l { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
td.miss { color: #b00; background: #fff2f2 !important; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .4em;
          border-radius: 2px; vertical-align: baseline; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, cls=None) -> str:
    """HTML table; the first ``left`` columns left-aligned. Cells are already escaped HTML."""
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>"
            for i, h in enumerate(head)]  # fmt: skip
    out.append("</tr></thead><tbody>")
    for ri, cells in enumerate(rows):
        out.append("<tr>")
        for i, c in enumerate(cells):
            classes = ["l"] if i < left else []
            if cls and cls(ri, i):
                classes.append(cls(ri, i))
            attr = f' class="{" ".join(classes)}"' if classes else ""
            out.append(f"<td{attr}>{c}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _summary_html(runs: Sequence[Run], sums: Sequence[Summary]) -> str:
    head = ["run", "algorithm", "rounds", "final acc.", "best acc. (round)",
            "MB to target (round)", "MB total", "MB down", "MB up", "MB fp32", "initial acc.",
            "seconds", "missing answers"]  # fmt: skip
    rows = []
    for run, s in zip(runs, sums, strict=True):
        to_target = (
            "not reached" if s.mb_to_target is None
            else f"{s.mb_to_target:.3f} ({s.rounds_to_target})"
        )  # fmt: skip
        rows.append([
            f'<span class="swatch" style="background:{run.color}"></span>{_e(run.name)}',
            _e(s.algorithm), str(s.rounds), f"<b>{_fmt(s.final_accuracy, '.4f')}</b>",
            f"{_fmt(s.best_accuracy, '.4f')} ({s.best_round})", f"<b>{to_target}</b>",
            f"<b>{s.mb_total:.3f}</b>", f"{s.mb_down:.3f}", f"{s.mb_up:.3f}",
            f"{s.mb_fp32:.3f}", _fmt(s.initial_accuracy, ".4f"), f"{s.seconds:.1f}",
            str(s.missing_answers),
        ])  # fmt: skip
    if all(math.isnan(s.target) for s in sums):  # one run and no --target: no such column
        head.pop(5)
        for cells in rows:
            cells.pop(5)
    return _table(head, rows, left=2)


def _rounds_html(run: Run) -> str:
    head = [
        "round",
        "status",
        "accuracy",
        "loss",
        "MB down",
        "MB up",
        "cumulative MB",
        "seconds",
        "training s",
        "comm. + wait s",
        "answers",
        "missing",
        "late refused",
    ]
    rows = []
    for rec, cum in zip(run.records, run.cumulative_mb, strict=True):
        t = _train_seconds(rec)
        rows.append([
            str(rec["round"]), _e(rec.get("status", "-")),
            _fmt(rec.get("global_accuracy"), ".4f"), _fmt(rec.get("global_loss"), ".4f"),
            f"{_num(rec, 'bytes_down') / 1e6:.3f}", f"{_num(rec, 'bytes_up') / 1e6:.3f}",
            f"{cum:.3f}", f"{_num(rec, 'wall_seconds'):.1f}", _fmt(t, ".1f"),
            f"{_comm_seconds(rec):.1f}" if rec["round"] > 0 else "-",
            str(rec.get("num_results", "-")),
            _e(", ".join(map(str, rec.get("missing") or [])) or "-"),
            str(rec.get("late_refused", 0)),
        ])  # fmt: skip
    status = [rec.get("status") for rec in run.records]
    return _table(head, rows, left=2,
                  cls=lambda ri, i: "miss" if status[ri] not in ("ok", "initial", None)
                  and i == 1 else None)  # fmt: skip


def _silos_html(run: Run) -> str:
    silos = run.silo_ids()
    head = ["round", *(_e(s) for s in silos)]
    rows, flags = [], []
    tot = {s: [0.0, 0.0] for s in silos}
    for rec in run.records:
        by_id = {str(s.get("silo_id")): s for s in rec.get("silos", [])}
        cells, f = [str(rec["round"])], [False]
        for sid in silos:
            s = by_id.get(sid)
            if s is None:
                cells.append("-")
                f.append(False)
                continue
            down, up = _num(s, "bytes_down") / 1e6, _num(s, "bytes_up") / 1e6
            tot[sid][0] += down
            tot[sid][1] += up
            status = s.get("status")
            bad = rec["round"] > 0 and status not in ("ok", None)
            cells.append(f"{down:.3f} / {up:.3f}" + (f" ({_e(status)})" if bad else ""))
            f.append(bad)
        rows.append(cells)
        flags.append(f)
    rows.append(["<b>total</b>", *(f"<b>{tot[s][0]:.3f} / {tot[s][1]:.3f}</b>" for s in silos)])
    flags.append([False] * (len(silos) + 1))
    return _table(head, rows, left=1, cls=lambda ri, i: "miss" if flags[ri][i] else None)


# The LSS pool diagnostics a silo reports (lssfl.training.lss), as metrics.jsonl names them.
POOL_KEYS = (
    ("train_distance_to_global", "soup to received", ".2e"),
    ("train_min_member_distance", "closest members", ".2e"),
    ("train_reg_to_loss_grad", "reg / loss grad", ".3f"),
)
COLLAPSE_RMS = 1e-3  # as lssfl.training.lss.COLLAPSE_RMS; the report reads files, not trainers


def _pool_html(run: Run) -> str | None:
    """Per round and silo, the LSS pool diagnostics; None when the run has none (not LSS)."""
    silos = run.silo_ids()
    rows, flags = [], []
    for rec in run.records:
        by_id = {str(s.get("silo_id")): s for s in rec.get("silos", [])}
        if not any(_is_num(s.get(POOL_KEYS[1][0])) for s in by_id.values()):
            continue
        cells, f = [str(rec["round"])], [False]
        for sid in silos:
            s = by_id.get(sid, {})
            cells.append(
                " / ".join(
                    _fmt(s.get(k), spec) if _is_num(s.get(k)) else "-" for k, _, spec in POOL_KEYS
                )
            )
            closest = s.get(POOL_KEYS[1][0])
            f.append(_is_num(closest) and closest < COLLAPSE_RMS)
        rows.append(cells)
        flags.append(f)
    if not rows:
        return None
    head = ["round", *(_e(s) for s in silos)]
    return _table(head, rows, left=1, cls=lambda ri, i: "miss" if flags[ri][i] else None)


def _html(title: str, runs: Sequence[Run], sums: Sequence[Summary], target, target_note) -> str:
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Written {now} by <code>lssfl report</code> from '
        f'{len(runs)} run folder{"s" if len(runs) != 1 else ""}:</p><ul class="meta">'
        + "".join(
            f'<li><span class="swatch" style="background:{r.color}"></span>{_e(r.label)}: '
            f"<code>{_e(r.path)}</code></li>"
            for r in runs
        )
        + "</ul>",
        "<h2>Summary</h2>",
        _summary_html(runs, sums),
        '<p class="note">Accuracy: the global model on the held-out test split; round 0 is the '
        "initial model, before any federated round. MB: serialized gRPC messages (1 MB = "
        "10<sup>6</sup> bytes), all silos and rounds; MB fp32: what the tensors carried would "
        "weigh uncompressed. "
        + (
            f"Target accuracy {target:.4f} ({_e(target_note)}); MB to target (round): the "
            "cumulative communication, and the round, when a run first reached it. "
            if target is not None and not math.isnan(target)
            else ""
        )
        + "Seconds: wall time of rounds 1 and later. Missing answers: (round, silo) pairs "
        "selected but not answered in time.</p>",
        "<h2>Plots</h2>",
    ]
    captions = {
        PLOTS[0][0]: "Test accuracy of the global model after each round.",
        PLOTS[1][0]: "Test accuracy against the MB exchanged so far (down + up, all silos): "
        "further left at the same height = fewer bytes for that accuracy.",
        PLOTS[2][0]: "MB each silo exchanged in each round (model down + update up); "
        "hatched: the silo did not send a model back. Round 0 left out.",
        PLOTS[3][0]: "Each round's wall time: the slowest answering silo's local training "
        "(the round waits for it), and the rest: transfers, aggregation and evaluation on the "
        "coordinator, and waiting for late or missing silos. Round 0 left out.",
    }
    for name, heading in PLOTS:
        parts.append(
            f'<figure><img src="{name}" alt="{_e(heading)}">'
            f"<figcaption><b>{_e(heading)}.</b> {_e(captions[name])}</figcaption></figure>"
        )
    parts.append("<h2>Per round</h2>")
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{_e(run.label)}</h3>")
        parts.append(_rounds_html(run))
    parts.append("<h2>Bytes per silo</h2>")
    parts.append(
        '<p class="note">MB down / MB up per silo and round; red: the silo was '
        "selected but sent no model back (missing) or was not selected (idle).</p>"
    )
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{_e(run.label)}</h3>")
        parts.append(_silos_html(run))
    pools = [(run, _pool_html(run)) for run in runs]
    if any(table for _, table in pools):
        parts.append("<h2>LSS pool</h2>")
        parts.append(
            '<p class="note">Per silo: RMS distance of the uploaded soup to the model it '
            "received / smallest RMS distance between two pool members / regulariser-to-loss "
            f"gradient norm ratio. Red: the pool collapsed (closest members under "
            f"{COLLAPSE_RMS:g}), so the soup is close to one model: lambda_a is strong for the "
            "learning rate; a ratio near 0 means the regulariser does nothing.</p>"
        )
        for run, table in pools:
            if table:
                if len(runs) > 1:
                    parts.append(f"<h3>{_e(run.label)}</h3>")
                parts.append(table)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _resolve_target(runs: Sequence[Run], target: float | None) -> tuple[float | None, str]:
    """The target accuracy and how it was chosen; none for a single run without --target."""
    if target is not None:
        return target, "set with --target"
    if len(runs) > 1:
        return default_target(runs), "the best accuracy the weakest run reached"
    return None, ""  # one run: its own best accuracy would be a line to nowhere


def _write_html(runs: list[Run], out_dir: Path, title: str, target: float | None) -> Path:
    _label_runs(runs)
    target, note = _resolve_target(runs, target)
    sums = [summarize(run, target) for run in runs]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plots(runs, out_dir, target, note)
    path = out_dir / "report.html"
    path.write_text(_html(title, runs, sums, target, note), encoding="utf-8")
    return path


# ----------------------------------------------------------------- entry points


def write_report(run_dir: Path, *, target: float | None = None) -> Path:
    """Write metrics.csv, report.md, report.html and the PNG plots into run_dir.

    Returns report.html's path (report.md's when the run recorded no rounds). Lenient about a
    missing metrics.jsonl (the launcher calls this after a failed run too); a malformed line
    raises ValueError.
    """
    run_dir = Path(run_dir)
    records = _unique_sorted(read_metrics(run_dir))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(row(r) for r in records)
    lines = [f"# Run {run_dir.name}", ""]
    if records:
        first, last = records[0], records[-1]
        total_down = sum(_num(r, "bytes_down") for r in records)
        total_up = sum(_num(r, "bytes_up") for r in records)
        lines += [
            f"- algorithm: {last.get('algorithm', '?')}",
            f"- rounds: {last['round']}",
            f"- global accuracy: {_fmt(first.get('global_accuracy'), '.4f')} "
            f"(round {first['round']}{', initial model' if first['round'] == 0 else ''}) -> "
            f"{_fmt(last.get('global_accuracy'), '.4f')} (round {last['round']})",
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
    if not records:
        return md
    return _write_html([Run(run_dir, records)], run_dir, f"lssfl run {run_dir.name}", target)


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
    resolved = _resolve_target(runs, target)[0]
    with open(Path(out_dir) / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([
            "run", "algorithm", "rounds", "final_accuracy", "best_accuracy", "best_round",
            "mb_total", "mb_down", "mb_up", "target", "mb_to_target", "rounds_to_target",
        ])  # fmt: skip
        for run in runs:
            s = summarize(run, resolved)
            reached = math.isnan(s.target) or s.mb_to_target is not None
            writer.writerow([
                str(run.path), s.algorithm, s.rounds, _fmt(s.final_accuracy, ".4f"),
                _fmt(s.best_accuracy, ".4f"), s.best_round, f"{s.mb_total:.3f}",
                f"{s.mb_down:.3f}", f"{s.mb_up:.3f}", _fmt(s.target, ".4f"),
                _fmt(s.mb_to_target, ".3f") if reached else "not reached",
                _fmt(s.rounds_to_target, "d") if reached else "not reached",
            ])  # fmt: skip
    return path


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
            f"{_fmt(acc, '.4f') + ' ' + _fmt(mb, '7.2f') + ' MB':>{w}}"
            for (acc, mb), w in zip(cells, widths, strict=False)
        )
        row += "".join(
            f"{_fmt((acc - cells[0][0]) * 100, '+.2f') + ' pts':>{w}}"
            for (acc, _), w in zip(cells[1:], widths[len(runs) :], strict=True)
        )
        lines.append(row)
    return lines


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
