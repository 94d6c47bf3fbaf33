"""The round record: one committed round as the coordinator writes it to ``metrics.jsonl``
and ``state.db``, and as ``lssfl report`` reads it back.

``RoundRecord.to_dict`` is the JSON object of one ``metrics.jsonl`` line, keys in field
order; ``from_dict`` reads one back (a resumed coordinator continues the running totals from
it, the report draws from it). Per silo, the trainer's own figures travel as ``train_<name>``
keys next to the fixed ones (``train_loss`` from every trainer, more from some).

``from_dict`` checks every field against its declared type and raises ``RecordError`` naming
the first key that is missing or wrong: a line from another version of lssfl, or one edited
by hand, is one clear error, never a ``KeyError`` deep in the report. Unknown keys are ignored,
so a newer writer's extra keys do not stop an older reader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The JSON types each declared field type accepts (bool is excluded from numbers: JSON true
# is not a count). Numbers may be written as ints where the field is a float.
_SCALARS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
}


class RecordError(ValueError):
    """A metrics object that is not a round record; the message names the key."""


def _check(d: Any, cls: type, where: str) -> dict[str, Any]:
    """``d`` as a dict whose declared fields of ``cls`` have their declared JSON types."""
    if not isinstance(d, dict):
        raise RecordError(f"{where}expected a JSON object, got {type(d).__name__}")
    for f in dataclasses.fields(cls):
        if f.name == "train_metrics":
            continue
        if f.name not in d and _has_default(f):
            continue
        if f.name not in d:
            raise RecordError(f"{where}missing key '{f.name}' (written by another lssfl version?)")
        v, kind = d[f.name], str(f.type)
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if v is None and optional:
            continue
        if kind in _SCALARS:
            ok = isinstance(v, _SCALARS[kind]) and (kind == "bool" or not isinstance(v, bool))
            if kind == "int" and ok and f.name == "round":
                ok = v >= 0
        elif kind.startswith("list["):
            ok = isinstance(v, list)
        else:
            ok = True
        if not ok:
            noun = {"int": "an integer", "float": "a number", "str": "a string"}.get(kind, "a list")
            raise RecordError(f"{where}'{f.name}' must be {noun}, got {v!r:.60}")
    return d


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


@dataclass
class SiloRound:
    """One silo's part in a round: what it answered, what it cost in bytes each way."""

    silo_id: str
    # "ok" (answered), "failed" (reported it could not do the task: ``failure`` says why),
    # "missing" (selected, no answer in time), "idle" (not selected, or only metered)
    status: str
    num_samples: int
    bytes_down: int  # serialized protobuf messages, as handed to gRPC
    bytes_up: int
    bytes_down_raw: int  # what the tensors carried weigh as uncompressed fp32
    bytes_up_raw: int
    bytes_down_payload: int  # encoded tensor bytes inside the messages (after codecs)
    bytes_up_payload: int
    train_seconds: float | None  # None: no answer
    train_metrics: dict[str, float] = field(default_factory=dict)  # train_<name>: value
    failure: str | None = None  # the reason a "failed" silo reported (ReportFailure)

    def to_dict(self) -> dict[str, Any]:
        """The silo's JSON object: the fixed keys, then ``train_metrics`` flattened in."""
        fixed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        metrics = fixed.pop("train_metrics")
        return fixed | metrics

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiloRound:
        """Read back what ``to_dict`` wrote; RecordError names a missing or mistyped key."""
        d = _check(d, cls, f"silo {d.get('silo_id')!r:.40}: " if isinstance(d, dict) else "")
        fixed = {f.name for f in dataclasses.fields(cls)} - {"train_metrics"}
        metrics = {
            k: v
            for k, v in d.items()
            if k not in fixed and k.startswith("train_") and isinstance(v, int | float)
        }
        return cls(**{k: d[k] for k in fixed if k in d}, train_metrics=metrics)


@dataclass
class SiloEvaluation:
    """One silo's measure of a global model on its own held-out data."""

    silo_id: str
    accuracy: float
    loss: float
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiloEvaluation:
        """Read back what ``to_dict`` wrote; RecordError names a missing or mistyped key."""
        d = _check(d, cls, "evaluation: ")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def weighted_mean(evaluations: list[SiloEvaluation]) -> tuple[float, float]:
    """(accuracy, loss) averaged over ``evaluations`` weighted by their sample counts."""
    total = sum(e.num_samples for e in evaluations)
    acc = sum(e.accuracy * e.num_samples for e in evaluations) / total
    loss = sum(e.loss * e.num_samples for e in evaluations) / total
    return acc, loss


@dataclass
class RoundRecord:
    """One committed round; round 0 is the initial model (status "initial", no silos trained)."""

    round: int
    algorithm: str  # the trainer's name
    status: str  # "initial", "ok" (aggregated), "insufficient" (too few results)
    # The global model after this round: on the coordinator's test split, or (evaluation at
    # the silos) the sample-weighted mean of the silos' figures. None: not measured yet (the
    # silos measure round r's model when they download it in round r + 1).
    global_accuracy: float | None
    global_loss: float | None
    bytes_down: int  # sums over silos, as in SiloRound
    bytes_down_raw: int
    bytes_down_payload: int
    bytes_up: int
    bytes_up_raw: int
    bytes_up_payload: int
    cum_bytes_down: int  # running totals since round 0: what the run has cost so far
    cum_bytes_up: int
    codec_down: str
    codec_up: str
    delta_downlink: bool
    wall_seconds: float
    num_results: int  # answers aggregated
    missing: list[str]  # selected but not answered in time
    late_refused: int  # answers refused because their round had closed
    silos: list[SiloRound]
    # Who measured global_accuracy: "coordinator", "silos" or "both" (then global_accuracy
    # is the coordinator's and silo_accuracy the silos' mean). Older run folders lack these.
    evaluation: str = "coordinator"
    silo_accuracy: float | None = None  # sample-weighted mean over `evaluations`
    silo_loss: float | None = None
    evaluations: list[SiloEvaluation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` object."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return d | {
            "silos": [s.to_dict() for s in self.silos],
            "evaluations": [e.to_dict() for e in self.evaluations],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        """Read back what ``to_dict`` wrote; RecordError names a missing or mistyped key
        (fields added since, which have defaults, may be absent)."""
        d = _check(d, cls, "")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: d[k] for k in fields if k in d}
            | {
                "silos": [SiloRound.from_dict(s) for s in d["silos"]],
                "evaluations": [SiloEvaluation.from_dict(e) for e in d.get("evaluations", [])],
            }
        )

    def add_evaluations(self, evaluations: list[SiloEvaluation]) -> None:
        """Record the silos' measures of this round's model (their weighted mean becomes
        ``global_accuracy`` unless the coordinator measured it too)."""
        self.evaluations = sorted(evaluations, key=lambda e: e.silo_id)
        self.silo_accuracy, self.silo_loss = weighted_mean(self.evaluations)
        if self.evaluation == "silos":
            self.global_accuracy, self.global_loss = self.silo_accuracy, self.silo_loss
