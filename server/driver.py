"""The coordinator's driver: the thread that opens rounds, waits for results or the
deadline, aggregates, evaluates, and records each round.

``RoundDriver`` is the driver half of ``lssfl.server.coordinator.Coordinator``, which owns the
state both halves share (declared below) and answers the silos' calls. The phase changes
only in ``_go``, through ``lssfl.server.phases.advance``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable

import torch

from lssfl.common.config import RunConfig
from lssfl.common.faults import crash_point
from lssfl.common.records import RoundRecord, SiloEvaluation
from lssfl.common.states import check_state
from lssfl.server.aggregate import AggregationRule
from lssfl.server.downlink import Downlink, Download
from lssfl.server.meter import DOWN, UP, Meter
from lssfl.server.phases import Phase, advance
from lssfl.server.results import SiloResult, kept_results
from lssfl.server.roster import Roster
from lssfl.server.roundrecord import RoundOutcome, RoundSetup, build_round_record, log_record
from lssfl.server.store import RoundStore

log = logging.getLogger("lssfl.coordinator")

Evaluate = Callable[[dict[str, torch.Tensor]], tuple[float, float]]
# How often the driver says it is still waiting for silos.
WAITING_LOG_S = 30.0


class RoundDriver:
    """Runs the rounds over the state it shares with the RPC side, behind ``_cond``."""

    cfg: RunConfig
    store: RoundStore
    evaluate: Evaluate | None
    on_round: Callable[[RoundRecord], None] | None
    run_id: str
    meter: Meter
    rule: AggregationRule
    downlink: Downlink
    global_state: dict[str, torch.Tensor]
    roster: Roster
    rounds_closed: int
    _cond: threading.Condition
    _stopping: threading.Event
    _progress_lock: threading.Lock
    _round: int
    _phase: Phase
    _selected: set[str]
    _results: dict[str, SiloResult]
    _kept_up: dict[str, tuple[int, int, int]]
    _failed: dict[str, str]
    _late: dict[int, int]
    _deadline: float
    _download: Download
    _evaluations: dict[str, SiloEvaluation]
    _last_record: RoundRecord | None
    _silo_eval: bool
    _setup: RoundSetup

    def _go(self, to: Phase) -> None:
        """Move the state machine to phase ``to`` (holding the lock)."""
        self._phase = advance(self._phase, to)

    def stop(self) -> None:
        """Make ``run`` return soon (SIGTERM)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _alive(self, now: float) -> list[str]:
        return self.roster.alive(now)

    def _wanted(self) -> int:
        """How many results make a round (the first to arrive, under over-selection)."""
        k = self.cfg.coordinator.silos_per_round
        return len(self.cfg.silos) if k is None else k

    def wait_for_silos(self) -> None:
        """Wait up to ``join_timeout_s`` for every silo; RuntimeError if fewer than
        ``min_silos`` joined by then."""
        bounds = self.cfg.coordinator
        end = time.monotonic() + bounds.join_timeout_s
        with self._cond:
            while len(self.roster.silos) < len(self.cfg.silos) and not self._stopping.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            joined = len(self.roster.silos)
        if self._stopping.is_set():
            raise KeyboardInterrupt
        if joined < bounds.min_silos:
            raise RuntimeError(
                f"only {joined} of {len(self.cfg.silos)} silos joined within "
                f"{bounds.join_timeout_s:g} s (min_silos={bounds.min_silos})"
            )
        missing = sorted(set(self.cfg.silos) - set(self.roster.silos))
        if missing:
            log.warning("starting without %s (join timeout passed)", ", ".join(missing))

    def wait_for_live_silos(self, round_num: int) -> None:
        """Return once ``min_silos`` silos are live, rather than open a round nobody can
        answer. RuntimeError after ``max_wait_s`` of waiting; KeyboardInterrupt on stop()."""
        bounds = self.cfg.coordinator
        start = time.monotonic()
        said = -math.inf  # when it last said it is waiting
        with self._cond:
            while not self._stopping.is_set():
                now = time.monotonic()
                alive = self._alive(now)
                if len(alive) >= bounds.min_silos:
                    if now - start >= WAITING_LOG_S:
                        log.info(
                            "round=%d %d silos live again after %.0f s",
                            round_num,
                            len(alive),
                            now - start,
                        )
                    return
                if bounds.max_wait_s is not None and now - start >= bounds.max_wait_s:
                    raise RuntimeError(
                        f"gave up before round {round_num}: only {len(alive)} of "
                        f"{len(self.cfg.silos)} silos live for {bounds.max_wait_s:g} s "
                        f"(min_silos={bounds.min_silos}, coordinator.max_wait_s)"
                    )
                if now - said >= WAITING_LOG_S:
                    said = now
                    log.warning(
                        "round=%d waiting for silos: %d live (%s), min_silos=%d",
                        round_num,
                        len(alive),
                        ", ".join(alive) or "none",
                        bounds.min_silos,
                    )
                self._cond.wait(1.0)
        raise KeyboardInterrupt

    def run(self) -> None:
        """Wait for silos, then run every round not yet committed; returns at the end."""
        first = self._start()
        for round_num in range(first, self.cfg.run.rounds + 1):
            self.wait_for_live_silos(round_num)
            self.run_round(round_num)
        self.store.save_final(self.global_state, self.cfg.model_spec)
        self.store.set_phase(self.cfg.run.rounds, Phase.DONE.value)
        self._finish()

    def _start(self) -> int:
        """Record round 0 of a new run, or take back a stored one; the first round to run."""
        t0 = time.monotonic()
        last = self.store.last_round()
        if last is not None:
            return self._resume(*last)
        self.wait_for_silos()
        acc, loss = self._evaluate_here()
        self._record(0, "initial", acc, loss, time.monotonic() - t0, [], [])
        return 1

    def _resume(self, done: int, state: dict[str, torch.Tensor]) -> int:
        """Take back the run committed up to round ``done``; the first round to run."""
        problem = check_state(state, self.global_state)
        if problem:
            raise RuntimeError(f"checkpoint of round {done} does not fit the model: {problem}")
        self.global_state = {k: state[k] for k in self.global_state}
        self.downlink.restore(self.store, done)
        with self._cond:
            self._round = first = done + 1
        if not self.cfg.coordinator.save_uploads:
            self.store.drop_uploads(done)  # a crash after a commit can leave them
        self.store.rewrite_metrics()
        self._last_record = self.store.records()[-1]
        log.info("resuming run %s after committed round %d", self.run_id, done)
        if first <= self.cfg.run.rounds:
            self.wait_for_silos()
        return first

    def run_round(self, round_num: int) -> None:
        """One round: select, serve, wait for results or the deadline, aggregate, record."""
        t0 = time.monotonic()
        selected = self._open_round(round_num)
        results, missing, evaluations = self._collect(round_num, selected)
        self._record_evaluations(evaluations)
        self.store.set_phase(round_num, Phase.AGGREGATE.value)
        crash_point(f"aggregate:{round_num}")
        status = self._aggregate(round_num, results)
        acc, loss = self._evaluate_here()
        final = (
            self._evaluate_at_silos(round_num)
            if self._silo_eval and round_num == self.cfg.run.rounds
            else []
        )
        self._record(round_num, status, acc, loss, time.monotonic() - t0, results, missing, final)
        if not self.cfg.coordinator.save_uploads:
            self.store.drop_uploads(round_num)
        with self._cond:
            self._go(Phase.CLOSED)

    def _open_round(self, round_num: int) -> list[str]:
        """Encode the round's download, select its silos and open it; the selected silos."""
        download = self.downlink.prepare(round_num, self.global_state)
        kept = kept_results(self.store, round_num, self.cfg.silos, self.run_id, self.global_state)
        with self._cond:
            self._round = round_num
            self._go(Phase.TRAIN)
            self._download = download
            self._selected = self.rule.select(self._alive(time.monotonic()), round_num)
            self._results = {s: r for s, r in kept.items() if s in self._selected}
            self._kept_up = {s: r.bytes_up for s, r in self._results.items()}
            self._failed = {}
            self._deadline = time.monotonic() + self.cfg.coordinator.round_deadline_s
            selected = sorted(self._selected)
            self._cond.notify_all()
        with self._progress_lock:  # one write: a reader never sees the new round with old lists
            self.store.put(
                round=round_num,
                phase=Phase.TRAIN.value,
                selected=json.dumps(selected),
                reported="[]",
            )
        log.info("round=%d opened for %s", round_num, ", ".join(selected))
        for silo in sorted(self._kept_up):
            log.info(
                "round=%d silo=%s upload kept from before the restart: not asked to train again",
                round_num,
                silo,
            )
        return selected

    def _collect(
        self, round_num: int, selected: list[str]
    ) -> tuple[list[SiloResult], list[str], list[SiloEvaluation]]:
        """Wait for the results or the deadline, then close the round: the results to
        aggregate, the selected silos without one, and the evaluations the results carry."""
        with self._cond:
            wanted = min(self._wanted(), len(self._selected))
            while not self._stopping.is_set() and len(self._results) < wanted:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                why = self._nothing_to_wait_for()
                if why:
                    log.warning("round=%d closing early: %s", round_num, why)
                    break
                self._cond.wait(min(left, 1.0))
            self._go(Phase.AGGREGATE)
            self.rounds_closed += 1  # streams opened before now have no use left
            # Over-selection: the first k to arrive make the round.
            first_k = list(self._results.values())[: self._wanted()]
            results = sorted(first_k, key=lambda r: r.silo_id)
            arrived = set(self._results)
            # Every silo that answered measured the model it received, aggregated or not.
            evaluations = [r.evaluation for r in self._results.values() if r.evaluation]
        if self._stopping.is_set():
            raise KeyboardInterrupt
        missing = sorted(set(selected) - arrived)
        if missing:
            log.warning("round=%d closed without %s", round_num, ", ".join(missing))
        return results, missing, evaluations

    def _aggregate(self, round_num: int, results: list[SiloResult]) -> str:
        """The next global model from ``results``, by the aggregation rule; the round's
        status ("insufficient", model unchanged, below ``min_silos``)."""
        if len(results) >= self.cfg.coordinator.min_silos:
            self.global_state = self.rule.aggregate(
                (r.load() for r in results), [r.num_samples for r in results], self.global_state
            )
            return "ok"
        log.error(
            "round=%d only %d results (min_silos=%d): global model unchanged",
            round_num,
            len(results),
            self.cfg.coordinator.min_silos,
        )
        return "insufficient"

    def _publish(self, record: RoundRecord) -> None:
        """Pass a committed (or newly measured) round to ``on_round``."""
        if self.on_round is not None:
            try:
                self.on_round(record)
            except Exception as exc:  # monitoring (a full disk ...) never stops the run
                log.warning("round=%d not written to TensorBoard: %s", record.round, exc)

    def _evaluate_here(self) -> tuple[float | None, float | None]:
        """The coordinator's own measure of the global model, when it has a test split."""
        if self.evaluate is None:
            return None, None
        return self.evaluate(self.global_state)

    def _record_evaluations(self, evaluations: list[SiloEvaluation]) -> None:
        """Attribute the silos' measures taken at this round's download to the round whose
        model they received (the last committed one), unless it has some already (a run
        resumed with more rounds evaluated its last model at the silos)."""
        previous = self._last_record
        if not evaluations or previous is None or previous.evaluations:
            return
        previous.add_evaluations(evaluations)
        self.store.update_record(previous)
        self._publish(previous)
        log.info(
            "round=%d silos measured accuracy=%.4f loss=%.4f on %d samples",
            previous.round,
            previous.silo_accuracy,
            previous.silo_loss,
            sum(e.num_samples for e in evaluations),
        )

    def _evaluate_at_silos(self, round_num: int) -> list[SiloEvaluation]:
        """After the last round: every live silo downloads the final model and reports its
        measure (EVALUATE tasks), until all have or the round deadline passes."""
        download = self.downlink.final(round_num, self.global_state)
        with self._cond:
            self._go(Phase.EVALUATE)
            self._download = download
            self._selected = set(self._alive(time.monotonic()))
            self._evaluations = {}
            self._deadline = time.monotonic() + self.cfg.coordinator.round_deadline_s
            self._cond.notify_all()
        self.store.set_phase(round_num, Phase.EVALUATE.value)
        log.info(
            "round=%d final model open for evaluation by %s",
            round_num,
            ", ".join(sorted(self._selected)) or "no live silo",
        )
        with self._cond:
            while not self._stopping.is_set() and len(self._evaluations) < len(self._selected):
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            self._go(Phase.AGGREGATE)
            evaluations = list(self._evaluations.values())
            absent = sorted(self._selected - set(self._evaluations))
        if self._stopping.is_set():
            raise KeyboardInterrupt
        if absent:
            log.warning("round=%d no evaluation from %s", round_num, ", ".join(absent))
        return evaluations

    def _nothing_to_wait_for(self) -> str | None:
        """Why no more results can come this round (every outstanding silo failed or went
        silent), or None while one still may. Called holding the lock."""
        now = time.monotonic()
        outstanding = sorted(self._selected - set(self._results))
        why = []
        for silo in outstanding:
            if silo in self._failed:
                why.append(f"{silo} reported a failure ({self._failed[silo]})")
                continue
            silent = now - self.roster.silos[silo].last_seen
            if silent <= self.roster.silent_after():
                return None
            why.append(f"{silo} no heartbeat for {silent:.0f} s")
        return "; ".join(why) or None

    def _record(
        self,
        round_num: int,
        status: str,
        acc: float | None,
        loss: float | None,
        seconds: float,
        results: list[SiloResult],
        missing: list[str],
        evaluations: list[SiloEvaluation] | None = None,
    ) -> None:
        """Build the round's record from this process's counts and the kept uploads'
        persisted bytes, commit it with the model, and publish it."""
        with self._cond:
            late = self._late.get(round_num, 0)
            declared = self.roster.declared()
            failed = dict(self._failed)
            kept_up = dict(self._kept_up)
        traffic = {
            s: (self.meter.get(round_num, s, DOWN), self.meter.get(round_num, s, UP))
            for s in self.meter.silos(round_num)
        }
        outcome = RoundOutcome(
            round_num, status, acc, loss, seconds, results, missing, late, evaluations
        )
        record = build_round_record(
            self._setup, outcome, traffic, kept_up, declared, failed, self._last_record
        )
        self._last_record = record
        # With a delta downlink the next round is encoded against what silos hold now: stored
        # with the round, so a resumed run sends the same bytes as an uninterrupted one.
        self.store.commit_round(self.global_state, record, self.downlink.to_store())
        self._publish(record)
        log_record(record, seconds)

    def _finish(self, grace_s: float = 10.0) -> None:
        """Tell every live silo the run is over (they exit on DONE), waiting a little."""
        end = time.monotonic() + grace_s
        with self._cond:
            self._go(Phase.DONE)
            self._cond.notify_all()
            while time.monotonic() < end:
                pending = [
                    s for s in self._alive(time.monotonic()) if not self.roster.silos[s].told_done
                ]
                if not pending:
                    break
                self._cond.wait(0.2)
