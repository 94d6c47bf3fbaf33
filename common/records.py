"""The round record: one committed round as the coordinator writes it to ``metrics.jsonl``
and ``state.db``, and as ``lssfl report`` reads it back.

``RoundRecord.to_dict`` is the JSON object of one ``metrics.jsonl`` line, keys in field
order; ``from_dict`` reads one back (a resumed coordinator continues the running totals from
it). Per silo, the trainer's own figures travel as ``train_<name>`` keys next to the fixed
ones (``train_loss`` from every trainer, more from some).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SiloRound:
    """One silo's part in a round: what it answered, what it cost in bytes each way."""

    silo_id: str
    status: str  # "ok" (answered), "missing" (selected, no answer in time), "idle"
    num_samples: int
    bytes_down: int  # serialized protobuf messages, as handed to gRPC
    bytes_up: int
    bytes_down_raw: int  # what the tensors carried weigh as uncompressed fp32
    bytes_up_raw: int
    bytes_down_payload: int  # encoded tensor bytes inside the messages (after codecs)
    bytes_up_payload: int
    train_seconds: float | None  # None: no answer
    train_metrics: dict[str, float] = field(default_factory=dict)  # train_<name>: value

    def to_dict(self) -> dict[str, Any]:
        """The silo's JSON object: the fixed keys, then ``train_metrics`` flattened in."""
        fixed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        metrics = fixed.pop("train_metrics")
        return fixed | metrics

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiloRound:
        """Read back what ``to_dict`` wrote."""
        fixed = {f.name for f in dataclasses.fields(cls)} - {"train_metrics"}
        metrics = {k: v for k, v in d.items() if k not in fixed and k.startswith("train_")}
        return cls(**{k: d[k] for k in fixed}, train_metrics=metrics)


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
        """Read back what ``to_dict`` wrote (fields added since default when absent)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: d[k] for k in fields if k in d}
            | {
                "silos": [SiloRound.from_dict(s) for s in d["silos"]],
                "evaluations": [SiloEvaluation(**e) for e in d.get("evaluations", [])],
            }
        )

    def add_evaluations(self, evaluations: list[SiloEvaluation]) -> None:
        """Record the silos' measures of this round's model (their weighted mean becomes
        ``global_accuracy`` unless the coordinator measured it too)."""
        self.evaluations = sorted(evaluations, key=lambda e: e.silo_id)
        self.silo_accuracy, self.silo_loss = weighted_mean(self.evaluations)
        if self.evaluation == "silos":
            self.global_accuracy, self.global_loss = self.silo_accuracy, self.silo_loss
