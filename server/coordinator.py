"""Coordinator: the round state machine behind the gRPC service.

One driver thread (``run``, the half in ``lssfl.server.driver``) opens rounds, waits for
results or the deadline, aggregates, evaluates and records; the gRPC worker threads call this
module's half: ``join``, ``get_task``, ``download``, ``upload``, ``heartbeat`` and the reports.
All shared state sits behind one condition variable, and no slow work (decoding,
aggregation) happens while holding it. The phase moves only through
``lssfl.server.phases.advance``; a refused call raises ``Refused`` with the refusal the
checks of ``lssfl.server.admission`` return, and the service turns it into a status code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from lssfl.common.codecs import parse_codec
from lssfl.common.config import RunConfig
from lssfl.common.faults import crash_point
from lssfl.common.peertext import MAX_PEER_REASON, peer_text
from lssfl.common.records import RoundRecord, SiloEvaluation
from lssfl.common.wire import FP32, Message
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.server import admission
from lssfl.server.admission import DataSpec, Refusal, Refused
from lssfl.server.aggregate import aggregation_rule
from lssfl.server.downlink import Downlink, Download, statistics_names_of
from lssfl.server.driver import Evaluate, RoundDriver
from lssfl.server.intake import UploadBounds, checked_evaluation, read_upload
from lssfl.server.meter import DOWN, UP, Meter, Metered
from lssfl.server.phases import Phase
from lssfl.server.results import SiloInfo, SiloResult
from lssfl.server.roster import Roster
from lssfl.server.roundrecord import RoundSetup
from lssfl.server.store import HEARTBEAT_RECORD_S, RoundStore
from lssfl.server.tasks import Tasks

__all__ = ["Coordinator", "DataSpec", "Evaluate", "Snapshot"]

log = logging.getLogger("lssfl.coordinator")


def _refuse(refusal: Refusal | None) -> None:
    """Raise ``refusal`` when there is one."""
    if refusal is not None:
        raise Refused(refusal)


@dataclass
class Snapshot:
    """The coordinator's figures at one moment (lssfl.server.prometheus serves them)."""

    round: int
    rounds_completed: int
    live_silos: int
    enrolled_silos: int
    bytes_down: int  # serialized bytes sent and received since this process started
    bytes_up: int
    refusals: dict[str, int]  # refused calls by gRPC status code name
    global_accuracy: float | None


class Coordinator(RoundDriver):
    """The round state machine: joins, tasks, downloads, uploads; its driver (``run``,
    ``RoundDriver``) opens, closes, aggregates and records rounds."""

    def __init__(
        self,
        cfg: RunConfig,
        store: RoundStore,
        initial_state: dict[str, torch.Tensor],
        evaluate: Evaluate | None,
        run_id: str | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        data_spec: DataSpec | None = None,
    ) -> None:
        """``evaluate``: the global model on the coordinator's test split; None when only the
        silos evaluate (``cfg.evaluation.where``, resolved: never None here). ``on_round``:
        called with each round's record once it is committed (TensorBoard); an exception it
        raises is logged, not raised. ``data_spec``: the sample shape and class count silos must
        declare at Join (None: not checked)."""
        self.cfg = cfg
        self.on_round = on_round
        self.data_spec = data_spec
        self.store = store
        self.evaluate = evaluate
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.meter = Meter()
        self.rule = aggregation_rule(cfg)
        self.global_state = {k: v.detach().cpu().clone() for k, v in initial_state.items()}
        self._cond = threading.Condition()
        self.roster = Roster(cfg.silos, cfg.coordinator.heartbeat_interval_s)
        self._round = 0
        self._phase = Phase.WAITING
        self._selected: set[str] = set()
        self._results: dict[str, SiloResult] = {}
        # Bytes of this round's uploads kept from before a restart, as sent then.
        self._kept_up: dict[str, tuple[int, int, int]] = {}
        self._failed: dict[str, str] = {}  # this round's silos that reported a failure: why
        self._late: dict[int, int] = {}
        self._deadline = 0.0
        self._download = Download()
        self._last_record: RoundRecord | None = None
        self.codec_down = parse_codec(cfg.compression.downlink)
        self.codec_up = parse_codec(cfg.compression.uplink)
        # BatchNorm statistics go exact under a lossy downlink, as the silos send them.
        statistics = frozenset() if self.codec_down == FP32 else statistics_names_of(cfg.model_spec)
        self.downlink = Downlink(
            self.run_id, self.codec_down, cfg.compression.delta_downlink, statistics
        )
        self._stopping = threading.Event()
        self.rounds_closed = 0
        self.algorithm = str(cfg.trainer.get("name", "fedavg"))
        self.where = cfg.evaluation.where or "coordinator"
        self._silo_eval = self.where in ("silos", "both")
        self.tasks = Tasks(cfg, self.run_id, self.codec_up.name, self._silo_eval)
        self._upload_bounds = UploadBounds(
            int(cfg.coordinator.max_upload_mb * 2**20),
            cfg.coordinator.max_update_norm,
            self._silo_eval,
        )
        self._evaluations: dict[str, SiloEvaluation] = {}  # the EVALUATE phase's reports
        self._setup = RoundSetup(
            self.algorithm,
            self.codec_down.name,
            self.codec_up.name,
            cfg.compression.delta_downlink,
            self.where,
        )
        self._refusals: Counter[str] = Counter()
        self._progress_lock = threading.Lock()

    def count_refusal(self, status: str) -> None:
        """Count one refused call by its status name (the service counts every refusal)."""
        with self._cond:
            self._refusals[status] += 1

    def snapshot(self) -> Snapshot:
        """The figures a monitoring scrape shows, read in one go."""
        with self._cond:
            last = self._last_record
            return Snapshot(
                round=self._round,
                rounds_completed=last.round if last else 0,
                live_silos=len(self._alive(time.monotonic())),
                enrolled_silos=len(self.cfg.silos),
                bytes_down=self.meter.total(DOWN),
                bytes_up=self.meter.total(UP),
                refusals=dict(self._refusals),
                global_accuracy=last.global_accuracy if last else None,
            )

    @property
    def phase(self) -> Phase:
        """Where the state machine stands."""
        with self._cond:
            return self._phase

    def selected(self) -> list[str]:
        """The silos asked to train (or evaluate) in the open round."""
        with self._cond:
            return sorted(self._selected)

    def accepted(self) -> list[str]:
        """The silos whose result for the current round is accepted."""
        with self._cond:
            return sorted(self._results)

    def late_refused(self, round_num: int) -> int:
        """Results refused as late for ``round_num`` (counted in its record)."""
        with self._cond:
            return self._late.get(round_num, 0)

    def pending_task(self, silo_id: str) -> cpb.Task | None:
        """The task GetTask would hand ``silo_id`` now, or None when it would wait."""
        with self._cond:
            return self._task_for(silo_id)

    # ------------------------------------------------------------------ RPC side

    def _touch(self, silo_id: str, run_id: str) -> SiloInfo:
        """The calling silo, noted alive; Refused if unknown, not joined or of another run."""
        info = self.roster.touch(silo_id)
        _refuse(admission.check_run(run_id, self.run_id))
        return info

    def join(self, req: cpb.JoinRequest) -> cpb.JoinReply:
        """Enrol a configured silo (again after a restart); returns the run id."""
        if req.silo_id not in self.cfg.silos:
            log.warning("refused join from unknown silo %r", peer_text(req.silo_id))
            _refuse(admission.check_identity(req.silo_id, False, False))
        bound = self.cfg.coordinator.max_num_samples
        refusal = admission.check_join(
            req.num_samples, bound, req.sample_shape, req.num_classes, self.data_spec
        )
        if refusal:
            log.warning(
                "round=%d silo=%s join refused: %s", self._round, req.silo_id, refusal.message
            )
            _refuse(refusal)
        device, version = peer_text(req.device or "?"), peer_text(req.version or "?")
        with self._cond:
            rejoin = self.roster.enrol(req.silo_id, req.num_samples, device)
            reply = cpb.JoinReply(
                run_id=self.run_id,
                heartbeat_interval_s=self.cfg.coordinator.heartbeat_interval_s,
                current_round=self._round,
            )
            self._cond.notify_all()
        self.store.set_silo(req.silo_id, "joined", req.num_samples, device)
        log.info(
            "round=%d silo=%s %s (%d samples, %s, lssfl %s)",
            self._round,
            req.silo_id,
            "rejoined" if rejoin else "joined",
            req.num_samples,
            device,
            version,
        )
        return reply

    def _task_for(self, silo_id: str) -> cpb.Task | None:
        """The silo's task now (holding the lock), None when it has none."""
        if self._phase is Phase.DONE:
            return self.tasks.done(self._round)
        if silo_id not in self._selected:
            return None
        answered = silo_id in self._results or silo_id in self._failed
        if self._phase is Phase.TRAIN and not answered:
            return self.tasks.train(self._round, silo_id, self._deadline)
        if self._phase is Phase.EVALUATE and silo_id not in self._evaluations:
            return self.tasks.evaluate(self._round, self._deadline)
        return None

    def get_task(self, req: cpb.TaskRequest, wait_s: float = 5.0) -> cpb.Task:
        """The silo's next task: TRAIN, EVALUATE, DONE, or WAIT after ``wait_s`` (long poll)."""
        end = time.monotonic() + wait_s
        with self._cond:
            info = self._touch(req.silo_id, req.run_id)
            task = self._task_for(req.silo_id)
            while task is None and not self._stopping.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                task = self._task_for(req.silo_id)
            if task is not None and task.kind == cpb.Task.DONE:
                info.told_done = True
            return task or self.tasks.wait(self._round)

    def download(self, req: cpb.DownloadRequest) -> Metered:
        """This round's model for the silo: a delta when it holds last round's."""
        with self._cond:
            info = self._touch(req.silo_id, req.run_id)
            _refuse(admission.check_download(req.round, self._round, self._phase))
            info.state = "downloading"
            return self._download.for_silo(req.have_round if req.HasField("have_round") else None)

    def stream_deadline(self) -> float:
        """When a model stream opened now must have ended (monotonic): the open round's
        deadline, or one round's length from now between rounds."""
        with self._cond:
            if self._phase is Phase.TRAIN:
                return self._deadline
        return time.monotonic() + self.cfg.coordinator.round_deadline_s

    def admit_upload(self, header: pb.ModelChunk) -> cpb.UploadReply | None:
        """Whether the upload ``header`` announces may be read: Refused when refused, a reply
        when there is nothing to read (a duplicate), None when ``upload`` should go on."""
        head = header.upload
        with self._cond:
            self._touch(head.silo_id, head.run_id)
            self._admit(head.silo_id, head.round)
            if head.silo_id in self._results:
                return cpb.UploadReply(accepted=True, message="duplicate upload ignored")
            self.roster.silos[head.silo_id].state = "uploading"
        return None

    def upload(
        self,
        header: pb.ModelChunk,
        stream: Iterator[Message],
        slot: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> cpb.UploadReply:
        """Take one silo's result, admitted by ``admit_upload``: ``header`` (read and
        authenticated by the service: the caller is ``header.upload.silo_id``), then the rest of
        the stream, decoded while holding ``slot()`` (room in memory for one model) and kept on
        disk."""
        head = header.upload
        silo, round_num = head.silo_id, head.round
        with self._cond:
            declared = self.roster.silos[silo].num_samples
            reference = self.downlink.held
        with slot():
            result, payload = self._decode_and_keep(header, stream, declared, reference)
        crash_point(f"accepted:{round_num}:{silo}")
        with self._cond:
            self._admit(silo, round_num)  # the deadline may have passed while decoding
            self._results.setdefault(silo, result)
            self.roster.silos[silo].state = "idle"
            self._cond.notify_all()
        # For `lssfl run` and `lssfl status`; the lock keeps a slower writer from putting back
        # a shorter list.
        with self._progress_lock:
            with self._cond:
                reported = sorted(self._results) if self._round == round_num else None
            if reported is not None:
                self.store.put(reported=json.dumps(reported))
        log.info(
            "round=%d silo=%s upload accepted (%.2f MB, %d samples)",
            round_num,
            silo,
            payload / 1e6,
            head.num_samples,
        )
        return cpb.UploadReply(accepted=True, message="ok")

    def _decode_and_keep(
        self,
        header: pb.ModelChunk,
        stream: Iterator[Message],
        declared: int,
        reference: dict[str, torch.Tensor] | None,
    ) -> tuple[SiloResult, int]:
        """Decode the upload after ``header``, check it, and save it to disk: the result and
        its payload bytes. On disk before it counts: the round aggregates from there, and a
        restarted coordinator finds it instead of asking the silo to train again."""
        head = header.upload
        upload = read_upload(
            header, stream, declared, reference, self.global_state, self._upload_bounds
        )
        up = self.meter.get(head.round, head.silo_id, UP)
        result = SiloResult(
            head.silo_id,
            int(head.num_samples),
            head.train_seconds,
            dict(head.metrics),
            (up.bytes, up.raw, up.payload),
            evaluation=upload.evaluation,
        )
        result.path = self.store.save_upload(
            head.round, head.silo_id, upload.state, result.meta(self.run_id, head.round)
        )
        return result, upload.payload_bytes

    def _admit(self, silo: str, round_num: int) -> None:
        """Refuse results for rounds that are not open (holding the lock); a result for the
        round just closed counts as late in that round's record."""
        refusal = admission.check_result_round(
            silo, round_num, self._round, self._phase, silo in self._selected
        )
        if refusal is None:
            return
        if round_num > self._round:
            log.warning("round=%d silo=%s result for a round not yet open refused", round_num, silo)
        elif round_num != self._round or self._phase is not Phase.TRAIN:
            log.warning("round=%d silo=%s late result refused", round_num, silo)
        if refusal.late:
            # Its record is still to come: count it there. Committed rounds are not rewritten.
            self._late[round_num] = self._late.get(round_num, 0) + 1
        raise Refused(refusal)

    def report_evaluation(self, req: cpb.EvaluationReport) -> cpb.EvaluationReply:
        """A silo's measure of the final model, answering its EVALUATE task."""
        with self._cond:
            self._touch(req.silo_id, req.run_id)
            _refuse(
                admission.check_evaluation_round(
                    req.round, self._round, self._phase, req.silo_id in self._selected
                )
            )
        with self._cond:
            declared = self.roster.silos[req.silo_id].num_samples
        evaluation = checked_evaluation(req.silo_id, req.round, req.evaluation, declared)
        reply = cpb.EvaluationReply(accepted=True, message="ok")
        with self._cond:
            if self._phase is Phase.EVALUATE and req.round == self._round:
                self._evaluations.setdefault(req.silo_id, evaluation)
                self._cond.notify_all()
        log.info(
            "round=%d silo=%s evaluated the final model: accuracy=%.4f on %d samples",
            req.round,
            req.silo_id,
            evaluation.accuracy,
            evaluation.num_samples,
        )
        return reply

    def heartbeat(self, req: cpb.HeartbeatRequest) -> cpb.HeartbeatReply:
        """Note the silo alive (and its state); returns the current round."""
        with self._cond:
            info = self._touch(req.silo_id, req.run_id)
            info.state = peer_text(req.state, 32) if req.state else info.state
            reply = cpb.HeartbeatReply(current_round=self._round)
            record = info.last_seen - info.recorded_at >= HEARTBEAT_RECORD_S
            if record:
                info.recorded_at = info.last_seen
        if record:  # for `lssfl status`
            self.store.set_silo(req.silo_id, info.state, info.num_samples, info.device)
        return reply

    def report_failure(self, req: cpb.FailureReport) -> cpb.FailureReply:
        """A silo could not do its task: log why, and stop waiting for it this round."""
        reason = peer_text(" ".join(req.reason.split()) or "no reason given", MAX_PEER_REASON)
        with self._cond:
            self._touch(req.silo_id, req.run_id)
            reply = cpb.FailureReply(current_round=self._round)
            current = req.round == self._round and self._phase is Phase.TRAIN
            if current and req.silo_id in self._selected and req.silo_id not in self._results:
                self._failed[req.silo_id] = reason
                self.roster.silos[req.silo_id].state = "failed"
                self._cond.notify_all()
            else:
                current = False
        log.warning(
            "round=%d silo=%s reported a failure%s: %s",
            req.round,
            req.silo_id,
            "" if current else " (not for the open round; ignored)",
            reason,
        )
        return reply
