"""report.html: one HTML file without JavaScript; the plots are the PNG files next to it,
referenced by relative path, so the folder can be moved or zipped as a whole."""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from lssfl.report.plots import PLOTS
from lssfl.report.runs import Run, Summary, is_num, time_splits, train_seconds
from lssfl.report.tables import fmt

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
            _e(s.algorithm), str(s.rounds), f"<b>{fmt(s.final_accuracy, '.4f')}</b>",
            f"{fmt(s.best_accuracy, '.4f')} ({s.best_round})", f"<b>{to_target}</b>",
            f"<b>{s.mb_total:.3f}</b>", f"{s.mb_down:.3f}", f"{s.mb_up:.3f}",
            f"{s.mb_fp32:.3f}", fmt(s.initial_accuracy, ".4f"), f"{s.seconds:.1f}",
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
        "start-up s",
        "comm. + wait s",
        "answers",
        "missing",
        "late refused",
    ]
    rows = []
    splits = time_splits(run.records)
    for rec, cum, split in zip(run.records, run.cumulative_mb, splits, strict=True):
        t = train_seconds(rec)
        rows.append([
            str(rec.round), _e(rec.status),
            fmt(rec.global_accuracy, ".4f"), fmt(rec.global_loss, ".4f"),
            f"{rec.bytes_down / 1e6:.3f}", f"{rec.bytes_up / 1e6:.3f}",
            f"{cum:.3f}", f"{rec.wall_seconds:.1f}", fmt(t, ".1f"),
            f"{split.startup:.1f}" if split.startup else "-",
            f"{split.rest:.1f}" if rec.round > 0 else "-",
            str(rec.num_results),
            _e(", ".join(map(str, rec.missing)) or "-"),
            str(rec.late_refused),
        ])  # fmt: skip
    status = [rec.status for rec in run.records]
    return _table(head, rows, left=2,
                  cls=lambda ri, i: "miss" if status[ri] not in ("ok", "initial", None)
                  and i == 1 else None)  # fmt: skip


def _silos_html(run: Run) -> str:
    silos = run.silo_ids()
    head = ["round", *(_e(s) for s in silos)]
    rows, flags = [], []
    tot = {s: [0.0, 0.0] for s in silos}
    for rec in run.records:
        by_id = {s.silo_id: s for s in rec.silos}
        cells, f = [str(rec.round)], [False]
        for sid in silos:
            s = by_id.get(sid)
            if s is None:  # no traffic at all: it had left, or never joined
                cells.append("absent" if rec.round > 0 else "-")
                f.append(rec.round > 0)
                continue
            down, up = s.bytes_down / 1e6, s.bytes_up / 1e6
            tot[sid][0] += down
            tot[sid][1] += up
            status = s.status
            bad = rec.round > 0 and status not in ("ok", None)
            # A failed silo's reason (it reported it) shows on hover: too long for a cell.
            label = (
                f'<span title="{_e(s.failure)}">{_e(status)}</span>' if s.failure else _e(status)
            )
            cells.append(f"{down:.3f} / {up:.3f}" + (f" ({label})" if bad else ""))
            f.append(bad)
        rows.append(cells)
        flags.append(f)
    rows.append(["<b>total</b>", *(f"<b>{tot[s][0]:.3f} / {tot[s][1]:.3f}</b>" for s in silos)])
    flags.append([False] * (len(silos) + 1))
    return _table(head, rows, left=1, cls=lambda ri, i: "miss" if flags[ri][i] else None)


# The LSS pool diagnostics a silo reports (lssfl.training.lss), as metrics.jsonl names them.
POOL_KEYS = (
    ("train_pool_spread", "spread", ".2f"),
    ("train_pool_disagreement", "disagreement", ".3f"),
    ("train_distance_to_global", "soup to received", ".2e"),
    ("train_reg_to_loss_grad", "reg / loss grad", ".3f"),
)
ALIVE_SPREAD = 0.1  # as lssfl.training.lss.ALIVE_SPREAD; the report reads files, not trainers


def _pool_html(run: Run) -> str | None:
    """Per round and silo, the LSS pool diagnostics; None when the run has none (not LSS)."""
    silos = run.silo_ids()
    rows, flags = [], []
    for rec in run.records:
        by_id = {s.silo_id: s.train_metrics for s in rec.silos}
        if not any(is_num(m.get(POOL_KEYS[0][0])) for m in by_id.values()):
            continue
        cells, f = [str(rec.round)], [False]
        for sid in silos:
            m = by_id.get(sid, {})
            cells.append(" / ".join(fmt(m.get(k), spec) for k, _, spec in POOL_KEYS))
            spread = m.get(POOL_KEYS[0][0])
            f.append(is_num(spread) and spread < ALIVE_SPREAD)
        rows.append(cells)
        flags.append(f)
    if not rows:
        return None
    head = ["round", *(_e(s) for s in silos)]
    return _table(head, rows, left=1, cls=lambda ri, i: "miss" if flags[ri][i] else None)


def _evaluations_html(run: Run) -> str | None:
    """Per round and silo, the silo's measure of that round's model on its own held-out data
    (accuracy, samples); None when the silos did not evaluate."""
    if not any(rec.evaluations for rec in run.records):
        return None
    silos = sorted({e.silo_id for rec in run.records for e in rec.evaluations})
    rows = []
    for rec in run.records:
        by_id = {e.silo_id: e for e in rec.evaluations}
        cells = [str(rec.round), fmt(rec.silo_accuracy, ".4f")]
        for sid in silos:
            e = by_id.get(sid)
            cells.append("-" if e is None else f"{e.accuracy:.4f} ({e.num_samples})")
        rows.append(cells)
    head = ["round", "weighted mean", *(_e(s) for s in silos)]
    return _table(head, rows, left=1)


def _optional_section(
    runs: Sequence[Run], table_of: Callable[[Run], str | None], heading: str, note: str
) -> list[str]:
    """A heading, a note and each run's table, or nothing when no run has one."""
    tables = [(run, table_of(run)) for run in runs]
    if not any(table for _, table in tables):
        return []
    parts = [f"<h2>{_e(heading)}</h2>", f'<p class="note">{_e(note)}</p>']
    for run, table in tables:
        if table:
            if len(runs) > 1:
                parts.append(f"<h3>{_e(run.label)}</h3>")
            parts.append(table)
    return parts


def html_page(title: str, runs: Sequence[Run], sums: Sequence[Summary], target, target_note) -> str:
    """report.html's text: summary, plots, per-round and per-silo tables."""
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
        PLOTS[2][0]: "MB each silo exchanged in each round, model down (solid) and update up "
        "(light) as separate bars; hatched: the silo did not send a model back; a cross: the "
        "silo was absent (no traffic at all that round). Round 0 left out.",
        PLOTS[3][0]: "Each round's wall time: the slowest answering silo's local training "
        "(the round waits for it); start-up (grey, dotted): round 0 is waiting for the silos "
        "to join and the initial evaluation, and in round 1 the communication and waiting "
        "beyond the later rounds' median (first download, each silo's first steps); the rest: "
        "transfers, aggregation and evaluation on the coordinator, and waiting for late or "
        "missing silos.",
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
        "selected but sent no model back (missing), was not selected (idle), or was absent "
        "(no traffic at all: it had left or never joined).</p>"
    )
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{_e(run.label)}</h3>")
        parts.append(_silos_html(run))
    parts += _optional_section(
        runs,
        _evaluations_html,
        "Evaluation at the silos",
        "Each silo's accuracy (held-out samples) of the global model after the round, measured "
        "on its own held-out data when it received that model (the last round's: after the "
        "run, in an evaluation task); the weighted mean weighs them by their sample counts. "
        "Where the silos alone evaluate, it is the accuracy shown above.",
    )
    parts += _optional_section(
        runs,
        _pool_html,
        "LSS pool",
        "Per silo: the pool's spread (its members' mean distance from each other over their "
        "mean distance from the model the silo received: size-free) / the fraction of the "
        "silo's samples on which two members predict different classes / RMS distance of the "
        "uploaded soup to the model it received / regulariser-to-loss gradient norm ratio. "
        f"Red: the pool collapsed (spread under {ALIVE_SPREAD:g}), so the soup is close to one "
        "model.",
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
