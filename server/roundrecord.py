"""One round's record, built from plain values: what each silo sent, received and reported."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from lssfl.common.records import RoundRecord, SiloEvaluation, SiloRound
from lssfl.server.meter import Count
from lssfl.server.results import SiloResult
from lssfl.training.lss_measures import collapsed_pools

log = logging.getLogger("lssfl.coordinator")


@dataclass(frozen=True)
class RoundSetup:
    """What every record of a run says the same way."""

    algorithm: str
    codec_down: str
    codec_up: str
    delta_downlink: bool
    evaluation: str  # where the global model is evaluated


@dataclass(frozen=True)
class RoundOutcome:
    """How one round ended: its status, the global model's measure, its results."""

    round: int
    status: str
    accuracy: float | None
    loss: float | None
    seconds: float
    results: list[SiloResult]  # the aggregated ones
    missing: list[str]  # selected silos without a result
    late_refused: int = 0
    evaluations: list[SiloEvaluation] | None = None  # the final model's, at the silos


def _train_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k if k.startswith("train_") else f"train_{k}": v for k, v in metrics.items()}


def _silo_round(
    silo: str,
    down: Count,
    up: Count,
    result: SiloResult | None,
    declared: int,
    failure: str | None,
    missing: bool,
) -> SiloRound:
    if result is not None:
        status = "ok"
    elif not missing:
        status = "idle"
    else:
        status = "failed" if failure is not None else "missing"
    return SiloRound(
        silo_id=silo,
        status=status,
        num_samples=result.num_samples if result else declared,
        bytes_down=down.bytes,
        bytes_up=up.bytes,
        bytes_down_raw=down.raw,
        bytes_up_raw=up.raw,
        bytes_down_payload=down.payload,
        bytes_up_payload=up.payload,
        train_seconds=round(result.train_seconds, 4) if result else None,
        train_metrics=_train_metrics(result.metrics if result else {}),
        failure=None if result else failure,
    )


def build_round_record(
    setup: RoundSetup,
    outcome: RoundOutcome,
    traffic: Mapping[str, tuple[Count, Count]],
    kept_bytes_up: Mapping[str, tuple[int, int, int]],
    declared: Mapping[str, int],
    failed: Mapping[str, str],
    previous: RoundRecord | None,
) -> RoundRecord:
    """The record of ``outcome``'s round.

    ``traffic``: the (down, up) bytes this process counted per silo this round; the record
    lists those silos and the missing ones. ``kept_bytes_up``: the (serialized, raw,
    payload) bytes of uploads kept from before a restart, counted up for their silos as
    sent then. ``declared``: joined silos' sample counts, for silos without a result;
    ``failed``: why silos reported a failure; ``previous``: the last committed record, for
    the cumulative bytes."""
    by_silo = {r.silo_id: r for r in outcome.results}
    silos = []
    for silo in sorted(set(traffic) | set(kept_bytes_up) | set(outcome.missing)):
        down, up = traffic.get(silo, (Count(), Count()))
        if silo in kept_bytes_up:
            sent, raw, payload = kept_bytes_up[silo]
            up = Count(up.messages + 1, up.bytes + sent, up.raw + raw, up.payload + payload)
        silos.append(
            _silo_round(
                silo,
                down,
                up,
                by_silo.get(silo),
                declared.get(silo, 0),
                failed.get(silo),
                silo in outcome.missing,
            )
        )
    bytes_down = sum(s.bytes_down for s in silos)
    bytes_up = sum(s.bytes_up for s in silos)
    record = RoundRecord(
        round=outcome.round,
        algorithm=setup.algorithm,
        status=outcome.status,
        global_accuracy=outcome.accuracy,
        global_loss=outcome.loss,
        bytes_down=bytes_down,
        bytes_down_raw=sum(s.bytes_down_raw for s in silos),
        bytes_down_payload=sum(s.bytes_down_payload for s in silos),
        bytes_up=bytes_up,
        bytes_up_raw=sum(s.bytes_up_raw for s in silos),
        bytes_up_payload=sum(s.bytes_up_payload for s in silos),
        cum_bytes_down=(previous.cum_bytes_down if previous else 0) + bytes_down,
        cum_bytes_up=(previous.cum_bytes_up if previous else 0) + bytes_up,
        codec_down=setup.codec_down,
        codec_up=setup.codec_up,
        delta_downlink=setup.delta_downlink,
        wall_seconds=round(outcome.seconds, 4),
        num_results=len(outcome.results),
        missing=outcome.missing,
        late_refused=outcome.late_refused,
        silos=silos,
        evaluation=setup.evaluation,
    )
    if outcome.evaluations:
        record.add_evaluations(outcome.evaluations)
    return record


def log_record(record: RoundRecord, seconds: float) -> None:
    """The round's line in the log, and a warning when silos' LSS pools collapsed."""
    log.info(
        "round=%d %s accuracy=%s loss=%s down=%.2fMB up=%.2fMB %.1fs",
        record.round,
        record.status,
        _figure(record.global_accuracy),
        _figure(record.global_loss),
        record.bytes_down / 1e6,
        record.bytes_up / 1e6,
        seconds,
    )
    spreads = {
        s.silo_id: v
        for s in record.silos
        if isinstance(v := s.train_metrics.get("train_pool_spread"), int | float)
    }
    if line := collapsed_pools(spreads):
        log.warning("round=%d %s", record.round, line)


def _figure(value: float | None) -> str:
    """A logged accuracy or loss; "pending" while the silos have yet to measure it."""
    return "pending" if value is None else f"{value:.4f}"
