"""The report's PNG plots, drawn with Matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lssfl.common.records import RoundRecord
from lssfl.report.runs import Run, natural_key, time_splits

PLOTS = (
    ("accuracy_per_round.png", "Accuracy per round"),
    ("accuracy_vs_mb.png", "Accuracy against cumulative communication"),
    ("bytes_per_silo.png", "Bytes per silo per round"),
    ("time_per_round.png", "Time per round: training and communication"),
)
TRAIN_COLOR, COMM_COLOR, STARTUP_COLOR = "#4c72b0", "#f2a154", "#b0b0b0"


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


def _not_aggregated(ax, x: Sequence[float], runs_recs: list[RoundRecord], acc, color) -> bool:
    pts = [(xi, a) for xi, r, a in zip(x, runs_recs, acc, strict=True)
           if r.status not in (None, "ok", "initial")]  # fmt: skip
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
    """Accuracy per round, one line per run, with the target accuracy if any."""
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
    """Accuracy against cumulative MB (down + up), one line per run."""
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


def _round_ticks(ax, runs: Sequence[Run], initial: bool = False) -> None:
    rounds = sorted({r.round for run in runs for r in (run.records if initial else run.trained)})
    if 0 < len(rounds) <= 20:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


MAX_BARS = 60  # bars per panel in the bytes plot; beyond that a heat map reads better


def _silo_grid(run: Run, silos: list[str]):
    """MB (down + up) and 'no model back' flags, silos x federated rounds (NaN: not listed)."""
    import numpy as np

    rounds = [r.round for r in run.trained]
    mb = np.full((len(silos), len(rounds)), np.nan)
    bad = np.zeros(mb.shape, dtype=bool)
    index = {s: i for i, s in enumerate(silos)}
    for j, rec in enumerate(run.trained):
        for s in rec.silos:
            i = index[s.silo_id]
            mb[i, j] = (s.bytes_down + s.bytes_up) / 1e6
            bad[i, j] = s.status not in ("ok", None)
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
                           label="no model back (missing / failed / idle)")  # fmt: skip
                ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
        ax.set_yticks(range(len(silos)), silos, fontsize=8 if len(silos) > 12 else 9)
        ax.set_title(run.label, fontsize=10, loc="left")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("round")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="MB per silo and round (down + up)")
    fig.suptitle("Bytes per silo per round (serialized gRPC messages, model down + update up)")
    return _save(fig, path)


@dataclass
class SiloBar:
    """One bar of the bytes plot: a silo's MB one way in one round."""

    round: int
    silo: str
    direction: str  # "down" or "up"
    mb: float
    status: str  # the silo's status that round, or "absent": not in the round's record


def silo_bars(run: Run, silos: Sequence[str]) -> list[SiloBar]:
    """The bytes plot's data: down and up apart, per federated round and silo."""
    bars = []
    for rec in run.trained:
        by_id = {s.silo_id: s for s in rec.silos}
        for silo in silos:
            s = by_id.get(silo)
            for direction in ("down", "up"):
                mb = 0.0 if s is None else getattr(s, f"bytes_{direction}") / 1e6
                bars.append(
                    SiloBar(rec.round, silo, direction, mb, "absent" if s is None else s.status)
                )
    return bars


def plot_bytes_per_silo(runs: Sequence[Run], path: Path) -> Path:
    """MB per silo per round, down and up as separate bars, or a heat map when there are
    many; an absent silo is a cross on the axis."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    silos = sorted({s for run in runs for s in run.silo_ids()}, key=natural_key)
    if 2 * len(silos) * max((len(run.trained) for run in runs), default=0) > MAX_BARS:
        return _bytes_heatmap(runs, silos, path)
    colors = dict(zip(silos, _silo_colors(len(silos)), strict=True))
    slot = 0.8 / max(1, len(silos))  # each silo's share of a round; down and up halves
    offset = {s: -0.4 + slot * j for j, s in enumerate(silos)}
    fig = _figure(8, 1.2 + 2.9 * len(runs))
    axes = fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    flags = set()
    for ax, run in zip(axes, runs, strict=True):
        for bar in silo_bars(run, silos):
            up = bar.direction == "up"
            x = bar.round + offset[bar.silo] + slot * (0.75 if up else 0.25)
            if bar.status == "absent":
                if not up:
                    ax.plot([x + slot / 4], [0], ls="none", marker="x", color="#d62728", ms=7)
                    flags.add("absent")
                continue
            drawn = ax.bar([x], [bar.mb], width=slot * 0.46, color=colors[bar.silo],
                           alpha=0.45 if up else 1.0)[0]  # fmt: skip
            if bar.status not in ("ok", None):
                flags.add("missing")
                drawn.set_facecolor("white")
                drawn.set_edgecolor(colors[bar.silo])
                drawn.set_hatch("///")
        ax.set_title(run.label, fontsize=10, loc="left")
        ax.set_ylabel("MB (left: down, right: up)")
        _style(ax)
        ax.grid(False, axis="x")
    _round_ticks(axes[-1], runs)
    axes[-1].set_xlabel("round")
    handles: list = [Patch(color=colors[s]) for s in silos]
    labels = list(silos)
    handles += [Patch(color="0.3"), Patch(color="0.3", alpha=0.45)]
    labels += ["down (model to silo)", "up (update from silo)"]
    if "missing" in flags:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///"))
        labels.append("missing / failed / idle (no model back)")
    if "absent" in flags:
        handles.append(Line2D([], [], ls="none", marker="x", color="#d62728"))
        labels.append("absent (no traffic)")
    fig.suptitle("Bytes per silo per round, down and up (serialized gRPC messages)")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(handles)),
               fontsize=9)  # fmt: skip
    return _save(fig, path)


def _silo_colors(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    if n <= 8:  # not tab10: those colours mark the runs in the other plots
        return [colormaps["Dark2"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def plot_time(runs: Sequence[Run], path: Path) -> Path:
    """Each round's wall time split into training, start-up and the rest (time_splits)."""
    fig = _figure(8, 1.2 + 2.7 * len(runs))
    axes = fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, run in zip(axes, runs, strict=True):
        splits = time_splits(run.records)
        x = [t.round for t in splits]
        train = [t.training for t in splits]
        startup = [t.startup for t in splits]
        first = ax is axes[0]
        ax.bar(x, train, width=0.6, color=TRAIN_COLOR,
               label="training (slowest silo)" if first else None)  # fmt: skip
        ax.bar(x, startup, width=0.6, bottom=train, color=STARTUP_COLOR, hatch="..",
               label="start-up (joins, first round)" if first else None)  # fmt: skip
        ax.bar(
            x,
            [t.rest for t in splits],
            width=0.6,
            bottom=[a + b for a, b in zip(train, startup, strict=True)],
            color=COMM_COLOR,
            label="communication + waiting" if first else None,
        )
        ax.set_title(run.label, fontsize=10, loc="left")
        ax.set_ylabel("seconds")
        _style(ax)
        ax.grid(False, axis="x")
    _round_ticks(axes[-1], runs, initial=True)
    axes[-1].set_xlabel("round")
    fig.suptitle("Wall time per round: training, start-up, communication and waiting")
    if any(run.records for run in runs):
        fig.legend(loc="outside lower center", ncols=3, fontsize=9)
    return _save(fig, path)


def write_plots(runs: Sequence[Run], out_dir: Path, target=None, target_note="") -> list[Path]:
    """Write the four PLOTS into ``out_dir``; returns their paths."""
    names = [name for name, _ in PLOTS]
    return [
        plot_accuracy(runs, out_dir / names[0], target, target_note),
        plot_accuracy_vs_mb(runs, out_dir / names[1], target, target_note),
        plot_bytes_per_silo(runs, out_dir / names[2]),
        plot_time(runs, out_dir / names[3]),
    ]
