"""Run folders as data: reading and checking metrics.jsonl, per-round figures, summaries.

A run is the records of one ``metrics.jsonl`` (one JSON object per round, written by the
coordinator); everything else in the report is drawn from the figures computed here.

Time per round is split as: training = the *slowest* answering silo's ``train_seconds`` (the
round waits for it), communication + waiting = ``wall_seconds`` - training (transfers, queueing,
aggregation and evaluation on the coordinator, and waiting for late or missing silos).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from lssfl.common.records import RecordError, RoundRecord

RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


# ----------------------------------------------------------------- reading


def is_num(v: Any) -> TypeGuard[int | float]:
    """A JSON number (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_metrics(run_dir: Path, *, strict: bool = False) -> list[RoundRecord]:
    """The rounds of ``run_dir/metrics.jsonl`` in file order, as typed records.

    Not strict (the launcher polls a running run): a missing file gives [] and an unfinished
    last line (no newline yet) is skipped. Strict: both raise ValueError. A malformed complete
    line (not JSON, or not a round record: ``RoundRecord.from_dict`` names the key) always
    raises ValueError naming the file and line.
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
            records.append(RoundRecord.from_dict(json.loads(line)))
        except json.JSONDecodeError as exc:
            if i == len(lines) and not strict:  # the last line, still being written
                break
            raise ValueError(
                f"{path}:{i}: not valid JSON ({exc.msg}, column {exc.colno})"
            ) from None
        except RecordError as exc:
            raise ValueError(f"{path}:{i}: {exc}") from None
    return records


# ----------------------------------------------------------------- per-round values


def train_seconds(rec: RoundRecord) -> float | None:
    """The slowest answering silo's training time in this round (None: nobody trained)."""
    times = [s.train_seconds for s in rec.silos if s.train_seconds is not None]
    return max(times) if times else None


def comm_seconds(rec: RoundRecord) -> float:
    """The round's wall time not spent in the slowest silo's training."""
    return max(0.0, rec.wall_seconds - (train_seconds(rec) or 0.0))


@dataclass
class TimeSplit:
    """A round's wall time in three parts that add up to it."""

    round: int
    training: float  # the slowest answering silo's
    startup: float  # round 0: waiting for the silos to join and the initial evaluation;
    # round 1: its communication + waiting beyond the later rounds' median (first download,
    # each silo's first steps); 0 elsewhere, and in round 1 when it is the only round
    rest: float  # communication and waiting


def time_splits(records: Sequence[RoundRecord]) -> list[TimeSplit]:
    """Each round's TimeSplit, start-up kept apart from training and communication."""
    later = [comm_seconds(r) for r in records if r.round >= 2]
    typical = statistics.median(later) if later else None
    out = []
    for r in records:
        if r.round == 0:
            out.append(TimeSplit(0, 0.0, r.wall_seconds, 0.0))
            continue
        rest = comm_seconds(r)
        startup = max(0.0, rest - typical) if r.round == 1 and typical is not None else 0.0
        out.append(TimeSplit(r.round, train_seconds(r) or 0.0, startup, rest - startup))
    return out


# ----------------------------------------------------------------- runs and summaries


@dataclass
class Run:
    """One run folder's rounds, with the label and colour it gets in a report."""

    path: Path
    records: list[RoundRecord]  # one per round, sorted, unique
    label: str = ""
    color: str = RUN_COLORS[0]
    enrolled: list[str] = field(default_factory=list)  # the config's silos, when known

    @property
    def name(self) -> str:
        """The run folder's name."""
        return self.path.name or self.path.resolve().name

    @property
    def algorithm(self) -> str:
        """The trainer the run used (the last round's), or '?'."""
        algos = [r.algorithm for r in self.records if r.algorithm]
        return str(algos[-1]) if algos else "?"

    @property
    def rounds(self) -> list[int]:
        """Round numbers, in order."""
        return [r.round for r in self.records]

    @property
    def accuracy(self) -> list[float]:
        """Global accuracy per round (NaN where not recorded)."""
        return [math.nan if r.global_accuracy is None else r.global_accuracy for r in self.records]

    @property
    def cumulative_mb(self) -> list[float]:
        """MB exchanged up to and including each round, down + up."""
        out, total = [], 0.0
        for r in self.records:
            total += (r.bytes_down + r.bytes_up) / 1e6
            out.append(total)
        return out

    @property
    def trained(self) -> list[RoundRecord]:
        """Federated rounds (round 0, the initial model, left out)."""
        return [r for r in self.records if r.round > 0]

    @property
    def codecs(self) -> str:
        """The last round's codecs: ``down fp16 delta, up int8+zstd``."""
        last = self.records[-1]
        delta = " delta" if last.delta_downlink else ""
        return f"down {last.codec_down}{delta}, up {last.codec_up}"

    def silo_ids(self) -> list[str]:
        """Every silo enrolled or appearing in any round, in natural order."""
        ids: set[str] = set(self.enrolled)
        for r in self.records:
            ids.update(s.silo_id for s in r.silos)
        return sorted(ids, key=natural_key)


def unique_sorted(records: list[RoundRecord]) -> list[RoundRecord]:
    """One record per round, sorted by round."""
    by_round = {r.round: r for r in records}  # a repeated round: the later line wins
    return [by_round[k] for k in sorted(by_round)]


def load_run(run_dir: Path) -> Run:
    """A run folder's metrics, strictly: ValueError when missing, malformed or empty."""
    run_dir = Path(run_dir)
    if run_dir.name == "metrics.jsonl" and run_dir.is_file():
        run_dir = run_dir.parent
    records = read_metrics(run_dir, strict=True)
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no rounds recorded")
    return Run(run_dir, unique_sorted(records), enrolled=enrolled_silos(run_dir))


def enrolled_silos(run_dir: Path) -> list[str]:
    """The silos of the run's config.yaml (the coordinator writes it); [] when unreadable: a
    silo that never joined is then left out of the report, not an error."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    silos = cfg.get("silos") if isinstance(cfg, dict) else None
    return [str(s) for s in silos[:10_000]] if isinstance(silos, list) else []


def label_runs(runs: list[Run]) -> None:
    """Give each run a distinct label and a colour, in order."""
    seen: dict[str, int] = {}
    for i, run in enumerate(runs):
        label = f"{run.algorithm}, {run.codecs} ({run.name})"
        seen[label] = seen.get(label, 0) + 1
        run.label = label if seen[label] == 1 else f"{label} #{seen[label]}"
        run.color = RUN_COLORS[i % len(RUN_COLORS)]


@dataclass
class Summary:
    """A run's headline figures: accuracy, MB, time, and MB to the target accuracy."""

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
    """The run's Summary; ``target`` adds when (MB, round) it was first reached."""
    acc = run.accuracy
    valid = [(a, r) for a, r in zip(acc, run.rounds, strict=True) if not math.isnan(a)]
    best, best_round = max(valid, key=lambda t: (t[0], -t[1])) if valid else (math.nan, 0)
    first = run.records[0]
    s = Summary(
        label=run.label or run.name,
        algorithm=run.algorithm,
        run=run.name,
        rounds=run.rounds[-1],
        initial_accuracy=acc[0] if first.round == 0 else math.nan,
        final_accuracy=acc[-1],
        best_accuracy=best,
        best_round=best_round,
        mb_down=sum(r.bytes_down for r in run.records) / 1e6,
        mb_up=sum(r.bytes_up for r in run.records) / 1e6,
        mb_total=run.cumulative_mb[-1],
        mb_fp32=sum(r.bytes_down_raw + r.bytes_up_raw for r in run.records) / 1e6,
        seconds=sum(r.wall_seconds for r in run.trained),
        missing_answers=sum(len(r.missing) for r in run.records),
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


def natural_key(text: str) -> list[Any]:
    """Sort key: silo-2 before silo-10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]
