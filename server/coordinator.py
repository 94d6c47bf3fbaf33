"""Coordinator: the round state machine behind the gRPC service.

One driver thread (``run``) opens rounds, waits for results or the deadline, aggregates,
evaluates and records; the gRPC worker threads call ``join``, ``get_task``, ``download``,
``upload`` and ``heartbeat``. All shared state sits behind one condition variable, and no
slow work (decoding, aggregation) happens while holding it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import load_file

from lssfl.common.codecs import parse_codec
from lssfl.common.config import RunConfig
from lssfl.common.faults import crash_point
from lssfl.common.models import build_model, statistics_names
from lssfl.common.peertext import MAX_PEER_REASON, check_metrics, peer_text
from lssfl.common.records import RecordError, RoundRecord, SiloEvaluation, SiloRound
from lssfl.common.seeding import derive_seed
from lssfl.common.wire import (
    FP32,
    Message,
    WireError,
    WireTensor,
    decode_after_header,
    held_state,
    pack_state,
    stream_tensors,
    to_wire,
)
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.aggregate import check_state, weighted_average
from lssfl.server.meter import DOWN, UP, Meter, Metered, message_sizes
from lssfl.server.store import HEARTBEAT_RECORD_S, RoundStore
from lssfl.training.lss_measures import collapsed_pools

log = logging.getLogger("lssfl.coordinator")

Evaluate = Callable[[dict[str, torch.Tensor]], tuple[float, float]]
# What every silo's data must look like for the model: one sample's shape (as the test
# data's), number of classes (0: unknown).
DataSpec = tuple[tuple[int, ...], int]
# Heartbeat intervals a silo may miss before it counts as gone (plus a 2 s allowance).
MISSED_BEATS = 3
# How often the driver says it is still waiting for silos.
WAITING_LOG_S = 30.0
# The final model's evaluation at the silos is always sent as exact fp32 (not delta, not
# lossy): it is the model final_model.safetensors holds.


class RpcError(Exception):
    """A refusal the service turns into a gRPC status; the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class SiloInfo:
    """What the coordinator knows of a joined silo."""

    silo_id: str
    num_samples: int
    device: str
    last_seen: float
    state: str = "idle"
    told_done: bool = False
    recorded_at: float = 0.0  # when its row in the store last followed a heartbeat
    joined_at: float = field(default_factory=time.monotonic)


@dataclass
class SiloResult:
    """One silo's accepted answer to a round; its model waits on disk at ``path``."""

    silo_id: str
    num_samples: int
    train_seconds: float
    metrics: dict[str, float]
    bytes_up: tuple[int, int, int]  # the upload's serialized, raw fp32 and payload bytes
    path: Path = Path()
    # The silo's measure of the model it received this round (the previous round's).
    evaluation: SiloEvaluation | None = None

    def meta(self, run_id: str, round_num: int) -> dict[str, str]:
        """What the upload's file keeps of this result beside the tensors."""
        return {
            "run_id": run_id,
            "round": str(round_num),
            "silo": self.silo_id,
            "num_samples": str(self.num_samples),
            "train_seconds": repr(self.train_seconds),
            "metrics": json.dumps(self.metrics),
            "bytes_up": json.dumps(list(self.bytes_up)),
            "evaluation": json.dumps(self.evaluation.to_dict() if self.evaluation else None),
        }

    @classmethod
    def from_meta(cls, path: Path, meta: dict[str, str]) -> SiloResult:
        """The result a kept upload's file describes (ValueError if it does not)."""
        try:
            metrics = json.loads(meta["metrics"])
            bytes_up = json.loads(meta["bytes_up"])
            evaluation = json.loads(meta.get("evaluation", "null"))
            return cls(
                meta["silo"],
                int(meta["num_samples"]),
                float(meta["train_seconds"]),
                {str(k): float(v) for k, v in metrics.items()},
                (int(bytes_up[0]), int(bytes_up[1]), int(bytes_up[2])),
                path,
                None if evaluation is None else SiloEvaluation.from_dict(evaluation),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecordError) as exc:
            raise ValueError(f"{path.name}: unreadable metadata ({exc})") from None

    def load(self) -> dict[str, torch.Tensor]:
        """The uploaded model, read back from disk."""
        return load_file(self.path)


@dataclass
class _Download:
    """One round's downlink, encoded once and streamed as the same bytes to every silo."""

    full: Metered = field(default_factory=list)
    delta: Metered | None = None  # for silos that hold the previous round's model
    base_round: int = -1


def _metered(tensors: list[WireTensor], header: pb.ModelChunk) -> Metered:
    return [(to_wire(m), message_sizes(m)) for m in stream_tensors(tensors, header)]


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


class Coordinator:
    """The round state machine: joins, tasks, downloads, uploads, aggregation."""

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
        self.global_state = {k: v.detach().cpu().clone() for k, v in initial_state.items()}
        self._cond = threading.Condition()
        self._silos: dict[str, SiloInfo] = {}
        self._round = 0
        self._phase = "waiting"  # waiting -> train -> aggregate -> closed -> train ... -> done
        self._selected: set[str] = set()
        self._results: dict[str, SiloResult] = {}
        self._failed: dict[str, str] = {}  # this round's silos that reported a failure: why
        self._late: dict[int, int] = {}
        self._deadline = 0.0
        self._download = _Download()
        # What silos hold after this round's download: equal to global_state unless a lossy
        # downlink codec is on. Uploads are decoded against it.
        self._broadcast: dict[str, torch.Tensor] | None = None
        self._last_record: RoundRecord | None = None
        self.codec_down = parse_codec(cfg.compression.downlink)
        self.codec_up = parse_codec(cfg.compression.uplink)
        # BatchNorm statistics go exact under a lossy downlink, as the silos send them.
        self._statistics = (
            frozenset() if self.codec_down == FP32 else _statistics_names(cfg.model_spec)
        )
        self._stopping = threading.Event()
        self.rounds_closed = 0
        self.algorithm = str(cfg.trainer.get("name", "fedavg"))
        # Every task carries these; serialized once, not on each long poll.
        self._model_json = json.dumps(cfg.model_spec, sort_keys=True)
        self._trainer_json = json.dumps(cfg.trainer, sort_keys=True)
        self.where = cfg.evaluation.where or "coordinator"
        self._silo_eval = self.where in ("silos", "both")
        self._evaluation_json = (
            json.dumps({"holdout": cfg.evaluation.holdout, "seed": cfg.run.seed})
            if self._silo_eval
            else ""
        )
        self._evaluations: dict[str, SiloEvaluation] = {}  # the EVALUATE phase's reports
        self._refusals: Counter[str] = Counter()
        self._progress_lock = threading.Lock()

    def count_refusal(self, code: grpc.StatusCode) -> None:
        """Count one refused call (the service calls this for every refusal it answers)."""
        with self._cond:
            self._refusals[code.name] += 1

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

    # ------------------------------------------------------------------ RPC side

    def _touch(self, silo_id: str) -> SiloInfo:
        info = self._silos.get(silo_id)
        if info is None:
            name = peer_text(silo_id)
            if silo_id not in self.cfg.silos:
                log.warning("refused unknown silo %r", name)
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED, f"unknown silo {name!r}")
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"silo {name!r} must join first")
        info.last_seen = time.monotonic()
        return info

    def _check_run(self, run_id: str) -> None:
        if run_id and run_id != self.run_id:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run_id!r} is not the current run {self.run_id!r}: join again",
            )

    def join(self, req: cpb.JoinRequest) -> cpb.JoinReply:
        """Enrol a configured silo (again after a restart); returns the run id."""
        if req.silo_id not in self.cfg.silos:
            name = peer_text(req.silo_id)
            log.warning("refused join from unknown silo %r", name)
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, f"unknown silo {name!r}")
        problem = self._join_problem(req)
        if problem:
            log.warning("round=%d silo=%s join refused: %s", self._round, req.silo_id, problem)
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        device, version = peer_text(req.device or "?"), peer_text(req.version or "?")
        with self._cond:
            rejoin = req.silo_id in self._silos
            self._silos[req.silo_id] = SiloInfo(
                req.silo_id, req.num_samples, device, time.monotonic()
            )
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

    def _join_problem(self, req: cpb.JoinRequest) -> str | None:
        """Why this silo cannot take part: a sample count out of bounds, or data that does
        not fit the model; None when it can."""
        bound = self.cfg.coordinator.max_num_samples
        if not 1 <= req.num_samples <= bound:
            return f"num_samples {req.num_samples} is not in [1, {bound}] (max_num_samples)"
        if self.data_spec is None:
            return None
        shape, classes = self.data_spec
        if req.sample_shape and tuple(req.sample_shape) != shape:
            declared = list(req.sample_shape)[:9]
            return f"data samples have shape {declared}, the model takes {list(shape)}"
        if classes and req.num_classes and req.num_classes != classes:
            return f"data has {req.num_classes} classes, the model predicts {classes}"
        return None

    def _task_for(self, silo_id: str) -> cpb.Task | None:
        if self._phase == "done":
            self._silos[silo_id].told_done = True
            return cpb.Task(kind=cpb.Task.DONE, run_id=self.run_id, round=self._round)
        if (
            self._phase == "train"
            and silo_id in self._selected
            and silo_id not in self._results
            and silo_id not in self._failed
        ):
            return cpb.Task(
                kind=cpb.Task.TRAIN,
                run_id=self.run_id,
                round=self._round,
                seed=derive_seed(self.cfg.run.seed, self._round, silo_id),
                model_json=self._model_json,
                trainer_json=self._trainer_json,
                deadline_unix_s=time.time() + (self._deadline - time.monotonic()),
                uplink_codec=self.codec_up.name,
                evaluation_json=self._evaluation_json,
            )
        if (
            self._phase == "evaluate"
            and silo_id in self._selected
            and silo_id not in self._evaluations
        ):
            return cpb.Task(
                kind=cpb.Task.EVALUATE,
                run_id=self.run_id,
                round=self._round,
                model_json=self._model_json,
                deadline_unix_s=time.time() + (self._deadline - time.monotonic()),
                evaluation_json=self._evaluation_json,
            )
        return None

    def get_task(self, req: cpb.TaskRequest, wait_s: float = 5.0) -> cpb.Task:
        """The silo's next task: TRAIN, EVALUATE, DONE, or WAIT after ``wait_s`` (long poll)."""
        end = time.monotonic() + wait_s
        with self._cond:
            self._touch(req.silo_id)
            self._check_run(req.run_id)
            task = self._task_for(req.silo_id)
            while task is None and not self._stopping.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                task = self._task_for(req.silo_id)
            return task or cpb.Task(kind=cpb.Task.WAIT, run_id=self.run_id, round=self._round)

    def download(self, req: cpb.DownloadRequest) -> Metered:
        """This round's model for the silo: a delta when it holds last round's."""
        with self._cond:
            info = self._touch(req.silo_id)
            self._check_run(req.run_id)
            if self._phase not in ("train", "evaluate") or req.round != self._round:
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"round {req.round} is not open for download (current round {self._round})",
                )
            info.state = "downloading"
            d = self._download
            holds_base = req.HasField("have_round") and req.have_round == d.base_round
            return d.delta if d.delta is not None and holds_base else d.full

    def stream_deadline(self) -> float:
        """When a model stream opened now must have ended (monotonic): the open round's
        deadline, or one round's length from now between rounds."""
        with self._cond:
            if self._phase == "train":
                return self._deadline
        return time.monotonic() + self.cfg.coordinator.round_deadline_s

    def admit_upload(self, header: pb.ModelChunk) -> cpb.UploadReply | None:
        """Whether the upload ``header`` announces may be read: RpcError when refused, a reply
        when there is nothing to read (a duplicate), None when ``upload`` should go on."""
        head = header.upload
        with self._cond:
            self._touch(head.silo_id)
            self._check_run(head.run_id)
            self._admit(head.silo_id, head.round)
            if head.silo_id in self._results:
                return cpb.UploadReply(accepted=True, message="duplicate upload ignored")
            self._silos[head.silo_id].state = "uploading"
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
            declared = self._silos[silo].num_samples
            reference = self._broadcast
            base = reference if reference is not None else self.global_state
        with slot():
            try:
                decoded = decode_after_header(
                    header,
                    stream,
                    max_payload_bytes=int(self.cfg.coordinator.max_upload_mb * 2**20),
                    reference=reference,
                    like=self.global_state,
                )
            except WireError as exc:
                log.warning("round=%d silo=%s rejected upload: %s", round_num, silo, exc)
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"bad upload stream: {exc}"
                ) from None
            self._validate(decoded.state, silo, round_num)
            self._check_weight(head, declared, decoded.state, base)
            evaluation = (
                self._check_evaluation(silo, round_num, head.evaluation)
                if self._silo_eval and head.HasField("evaluation")
                else None
            )
            up = self.meter.get(round_num, silo, UP)
            result = SiloResult(
                silo,
                int(head.num_samples),
                head.train_seconds,
                dict(head.metrics),
                (up.bytes, up.raw, up.payload),
                evaluation=evaluation,
            )
            # On disk before it counts: the round aggregates from there, and a restarted
            # coordinator finds it instead of asking the silo to train again.
            result.path = self.store.save_upload(
                round_num, silo, decoded.state, result.meta(self.run_id, round_num)
            )
            payload = decoded.payload_bytes
            del decoded
        crash_point(f"accepted:{round_num}:{silo}")
        with self._cond:
            self._admit(silo, round_num)  # the deadline may have passed while decoding
            self._results.setdefault(silo, result)
            self._silos[silo].state = "idle"
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

    def _check_weight(
        self,
        head: pb.UploadHeader,
        declared: int,
        state: dict[str, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> None:
        """Refuse an upload that would weigh more than its silo declared, carries metrics
        that cannot be stored, or moves the model further than ``max_update_norm``."""
        problem = None
        if not 1 <= head.num_samples <= declared:
            problem = f"num_samples {head.num_samples} is not in [1, {declared}] (declared at Join)"
        else:
            problem = check_metrics(head.metrics) or _metric_clash(head.metrics)
        bound = self.cfg.coordinator.max_update_norm
        if problem is None and bound is not None:
            norm = update_norm(state, base)
            if not norm <= bound:
                problem = f"update norm {norm:.4g} exceeds coordinator.max_update_norm {bound:g}"
        if problem:
            log.warning("round=%d silo=%s rejected upload: %s", head.round, head.silo_id, problem)
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, problem)

    def _admit(self, silo: str, round_num: int) -> None:
        """Refuse results for rounds that are not open; a result for the round just closed
        counts as late in that round's record."""
        if round_num == self._round and self._phase == "train":
            if silo not in self._selected:
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"silo {silo!r} was not selected for round {round_num}",
                )
            return
        if round_num > self._round:
            log.warning("round=%d silo=%s result for a round not yet open refused", round_num, silo)
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {round_num} is not open (current round {self._round}, {self._phase})",
            )
        if round_num == self._round and self._phase == "aggregate":
            # Its record is still to come: count it there. Committed rounds are not rewritten.
            self._late[round_num] = self._late.get(round_num, 0) + 1
        log.warning("round=%d silo=%s late result refused", round_num, silo)
        raise RpcError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"round {round_num} is closed (current round {self._round}, {self._phase})",
        )

    def _validate(self, state: dict[str, torch.Tensor], silo: str, round_num: int) -> None:
        problem = check_state(state, self.global_state)
        if problem:
            log.warning("round=%d silo=%s rejected upload: %s", round_num, silo, problem)
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, problem)

    def _check_evaluation(self, silo: str, round_num: int, ev: pb.Evaluation) -> SiloEvaluation:
        """A silo's evaluation, bounded: finite loss >= 0, accuracy in [0, 1], at least one
        and at most as many samples as the silo declared when it joined."""
        with self._cond:
            declared = self._silos[silo].num_samples
        problem = None
        if not (math.isfinite(ev.loss) and ev.loss >= 0):
            problem = f"evaluation loss must be a finite number >= 0, got {ev.loss!r}"
        elif not 0.0 <= ev.accuracy <= 1.0:  # False for NaN too
            problem = f"evaluation accuracy must be in [0, 1], got {ev.accuracy!r}"
        elif not 1 <= ev.num_samples <= declared:
            problem = (
                f"evaluation num_samples must be in [1, {declared}] (declared at join), "
                f"got {ev.num_samples}"
            )
        if problem:
            log.warning("round=%d silo=%s rejected evaluation: %s", round_num, silo, problem)
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return SiloEvaluation(silo, ev.accuracy, ev.loss, int(ev.num_samples))

    def report_evaluation(self, req: cpb.EvaluationReport) -> cpb.EvaluationReply:
        """A silo's measure of the final model, answering its EVALUATE task."""
        with self._cond:
            self._touch(req.silo_id)
            self._check_run(req.run_id)
            if (
                self._phase != "evaluate"
                or req.round != self._round
                or req.silo_id not in self._selected
            ):
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"no evaluation of round {req.round} is open (current round {self._round}, "
                    f"{self._phase})",
                )
        evaluation = self._check_evaluation(req.silo_id, req.round, req.evaluation)
        reply = cpb.EvaluationReply(accepted=True, message="ok")
        with self._cond:
            if self._phase == "evaluate" and req.round == self._round:
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
            info = self._touch(req.silo_id)
            self._check_run(req.run_id)
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
            self._touch(req.silo_id)
            self._check_run(req.run_id)
            reply = cpb.FailureReply(current_round=self._round)
            current = req.round == self._round and self._phase == "train"
            if current and req.silo_id in self._selected and req.silo_id not in self._results:
                self._failed[req.silo_id] = reason
                self._silos[req.silo_id].state = "failed"
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

    # ------------------------------------------------------------------ driver

    def stop(self) -> None:
        """Make ``run`` return soon (SIGTERM)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _silent_after(self) -> float:
        """Seconds without a call after which a silo counts as gone."""
        return MISSED_BEATS * self.cfg.coordinator.heartbeat_interval_s + 2.0

    def _alive(self, now: float) -> list[str]:
        timeout = self._silent_after()
        return sorted(s for s, i in self._silos.items() if now - i.last_seen <= timeout)

    def _prepare_download(self, round_num: int) -> _Download:
        """Encode this round's model once: in full, and as a change for silos that hold the
        previous round's model (delta_downlink). Also fixes what silos will hold."""
        header = pb.ModelChunk(download=pb.DownloadHeader(run_id=self.run_id, round=round_num))
        prev = self._broadcast  # rounds run in order: this is the previous round's
        if self.cfg.compression.delta_downlink and prev is not None:
            dheader = pb.ModelChunk()
            dheader.CopyFrom(header)
            dheader.download.base_round = round_num - 1
            delta = pack_state(self.global_state, self.codec_down, prev, exact=self._statistics)
            # What the silos will decode, so that both sides hold the same bytes.
            held = held_state(delta, prev)
            # Silos without last round's model get what the others now hold, exactly.
            download = _Download(
                _metered(pack_state(held), header), _metered(delta, dheader), round_num - 1
            )
        elif self.cfg.compression.delta_downlink or self.codec_down == FP32:
            held = self.global_state
            download = _Download(_metered(pack_state(held), header))
        else:
            full = pack_state(self.global_state, self.codec_down, exact=self._statistics)
            held = held_state(full)
            download = _Download(_metered(full, header))
        self._broadcast = held
        return download

    def _wanted(self) -> int:
        k = self.cfg.coordinator.silos_per_round
        return len(self.cfg.silos) if k is None else k

    def _select(self, round_num: int) -> set[str]:
        alive = self._alive(time.monotonic())
        k = self.cfg.coordinator.silos_per_round
        if k is None:
            return set(alive)
        rng = random.Random(derive_seed(self.cfg.run.seed, round_num, "selection"))
        return set(rng.sample(alive, min(len(alive), k + self.cfg.coordinator.over_select)))

    def wait_for_silos(self) -> None:
        """Wait up to ``join_timeout_s`` for every silo; RuntimeError if fewer than
        ``min_silos`` joined by then."""
        cc = self.cfg.coordinator
        end = time.monotonic() + cc.join_timeout_s
        with self._cond:
            while len(self._silos) < len(self.cfg.silos) and not self._stopping.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            joined = len(self._silos)
        if self._stopping.is_set():
            raise KeyboardInterrupt
        if joined < cc.min_silos:
            raise RuntimeError(
                f"only {joined} of {len(self.cfg.silos)} silos joined within "
                f"{cc.join_timeout_s:g} s (min_silos={cc.min_silos})"
            )
        missing = sorted(set(self.cfg.silos) - set(self._silos))
        if missing:
            log.warning("starting without %s (join timeout passed)", ", ".join(missing))

    def wait_for_live_silos(self, round_num: int) -> None:
        """Return once ``min_silos`` silos are live, rather than open a round nobody can
        answer. RuntimeError after ``max_wait_s`` of waiting; KeyboardInterrupt on stop()."""
        cc = self.cfg.coordinator
        start = time.monotonic()
        said = -math.inf  # when it last said it is waiting
        with self._cond:
            while not self._stopping.is_set():
                now = time.monotonic()
                alive = self._alive(now)
                if len(alive) >= cc.min_silos:
                    if now - start >= WAITING_LOG_S:
                        log.info(
                            "round=%d %d silos live again after %.0f s",
                            round_num,
                            len(alive),
                            now - start,
                        )
                    return
                if cc.max_wait_s is not None and now - start >= cc.max_wait_s:
                    raise RuntimeError(
                        f"gave up before round {round_num}: only {len(alive)} of "
                        f"{len(self.cfg.silos)} silos live for {cc.max_wait_s:g} s "
                        f"(min_silos={cc.min_silos}, coordinator.max_wait_s)"
                    )
                if now - said >= WAITING_LOG_S:
                    said = now
                    log.warning(
                        "round=%d waiting for silos: %d live (%s), min_silos=%d",
                        round_num,
                        len(alive),
                        ", ".join(alive) or "none",
                        cc.min_silos,
                    )
                self._cond.wait(1.0)
        raise KeyboardInterrupt

    def run(self) -> None:
        """Wait for silos, then run every round not yet committed; returns at the end."""
        t0 = time.monotonic()
        last = self.store.last_round()
        if last is None:
            first = 1
            self.wait_for_silos()
            acc, loss = self._evaluate_here()
            self._record(0, "initial", acc, loss, time.monotonic() - t0, [], [])
        else:
            done, state = last
            problem = check_state(state, self.global_state)
            if problem:
                raise RuntimeError(f"checkpoint of round {done} does not fit the model: {problem}")
            self.global_state = {k: state[k] for k in self.global_state}
            if self.cfg.compression.delta_downlink:
                self._broadcast = self.store.held_model(done)
            self._round = first = done + 1
            if not self.cfg.coordinator.save_uploads:
                self.store.drop_uploads(done)  # a crash after a commit can leave them
            self.store.rewrite_metrics()
            self._last_record = self.store.records()[-1]
            log.info("resuming run %s after committed round %d", self.run_id, done)
            if first <= self.cfg.run.rounds:
                self.wait_for_silos()
        for round_num in range(first, self.cfg.run.rounds + 1):
            self.wait_for_live_silos(round_num)
            self.run_round(round_num)
        self.store.save_final(self.global_state, self.cfg.model_spec)
        self.store.set_phase(self.cfg.run.rounds, "done")
        self._finish()

    def run_round(self, round_num: int) -> None:
        """One round: select, serve, wait for results or the deadline, aggregate, record."""
        t0 = time.monotonic()
        download = self._prepare_download(round_num)
        kept = self._kept_results(round_num)
        with self._cond:
            self._round, self._phase = round_num, "train"
            self._download = download
            self._selected = self._select(round_num)
            self._results = {s: r for s, r in kept.items() if s in self._selected}
            self._failed = {}
            self._deadline = time.monotonic() + self.cfg.coordinator.round_deadline_s
            selected = sorted(self._selected)
            self._cond.notify_all()
        with self._progress_lock:  # one write: a reader never sees the new round with old lists
            self.store.put(
                round=round_num, phase="train", selected=json.dumps(selected), reported="[]"
            )
        log.info("round=%d opened for %s", round_num, ", ".join(selected))
        for silo in sorted(self._results):
            self.meter.add(round_num, silo, UP, *self._results[silo].bytes_up)
            log.info(
                "round=%d silo=%s upload kept from before the restart: not asked to train again",
                round_num,
                silo,
            )
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
            self._phase = "aggregate"
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
        self._record_evaluations(evaluations)
        self.store.set_phase(round_num, "aggregate")
        crash_point(f"aggregate:{round_num}")
        if len(results) >= self.cfg.coordinator.min_silos:
            self.global_state = weighted_average(
                (r.load() for r in results), [r.num_samples for r in results], self.global_state
            )
            status = "ok"
        else:
            log.error(
                "round=%d only %d results (min_silos=%d): global model unchanged",
                round_num,
                len(results),
                self.cfg.coordinator.min_silos,
            )
            status = "insufficient"
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
            self._phase = "closed"

    def _tell(self, record: RoundRecord) -> None:
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
        self._tell(previous)
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
        header = pb.ModelChunk(download=pb.DownloadHeader(run_id=self.run_id, round=round_num))
        download = _Download(_metered(pack_state(self.global_state), header))
        with self._cond:
            self._phase = "evaluate"
            self._download = download
            self._selected = set(self._alive(time.monotonic()))
            self._evaluations = {}
            self._deadline = time.monotonic() + self.cfg.coordinator.round_deadline_s
            self._cond.notify_all()
        self.store.set_phase(round_num, "evaluate")
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
            self._phase = "aggregate"
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
            silent = now - self._silos[silo].last_seen
            if silent <= self._silent_after():
                return None
            why.append(f"{silo} no heartbeat for {silent:.0f} s")
        return "; ".join(why) or None

    def _kept_results(self, round_num: int) -> dict[str, SiloResult]:
        """Uploads accepted for ``round_num`` before a restart and still valid: a silo
        selected again counts with it, without training again (and its bytes as sent then)."""
        kept = {}
        for silo, (path, meta) in self.store.kept_uploads(round_num).items():
            if silo not in self.cfg.silos or meta.get("run_id") != self.run_id:
                continue
            try:
                result = SiloResult.from_meta(path, meta)
                problem = check_state(result.load(), self.global_state)
            except (ValueError, OSError) as exc:
                problem = str(exc)
            if problem or result.num_samples <= 0:
                log.warning("round=%d silo=%s kept upload not used: %s", round_num, silo, problem)
                continue
            kept[silo] = result
        return kept

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
        by_silo = {r.silo_id: r for r in results}
        silos = []
        for silo in sorted(set(self.meter.silos(round_num)) | set(missing)):
            down, up = (self.meter.get(round_num, silo, d) for d in (DOWN, UP))
            r = by_silo.get(silo)
            metrics = {} if r is None else r.metrics
            silos.append(
                SiloRound(
                    silo_id=silo,
                    status="ok" if r else self._silo_status(silo, missing),
                    num_samples=r.num_samples if r else self._silos[silo].num_samples,
                    bytes_down=down.bytes,
                    bytes_up=up.bytes,
                    bytes_down_raw=down.raw,
                    bytes_up_raw=up.raw,
                    bytes_down_payload=down.payload,
                    bytes_up_payload=up.payload,
                    train_seconds=round(r.train_seconds, 4) if r else None,
                    train_metrics={
                        k if k.startswith("train_") else f"train_{k}": v for k, v in metrics.items()
                    },
                    failure=None if r else self._failed.get(silo),
                )
            )
        bytes_down = sum(s.bytes_down for s in silos)
        bytes_up = sum(s.bytes_up for s in silos)
        previous = self._last_record
        record = RoundRecord(
            round=round_num,
            algorithm=self.algorithm,
            status=status,
            global_accuracy=acc,
            global_loss=loss,
            bytes_down=bytes_down,
            bytes_down_raw=sum(s.bytes_down_raw for s in silos),
            bytes_down_payload=sum(s.bytes_down_payload for s in silos),
            bytes_up=bytes_up,
            bytes_up_raw=sum(s.bytes_up_raw for s in silos),
            bytes_up_payload=sum(s.bytes_up_payload for s in silos),
            cum_bytes_down=(previous.cum_bytes_down if previous else 0) + bytes_down,
            cum_bytes_up=(previous.cum_bytes_up if previous else 0) + bytes_up,
            codec_down=self.codec_down.name,
            codec_up=self.codec_up.name,
            delta_downlink=self.cfg.compression.delta_downlink,
            wall_seconds=round(seconds, 4),
            num_results=len(results),
            missing=missing,
            late_refused=self._late.get(round_num, 0),
            silos=silos,
            evaluation=self.where,
        )
        if evaluations:
            record.add_evaluations(evaluations)
        self._last_record = record
        # With a delta downlink the next round is encoded against what silos hold now: stored
        # with the round, so a resumed run sends the same bytes as an uninterrupted one.
        held = self._broadcast if self.cfg.compression.delta_downlink else None
        self.store.commit_round(self.global_state, record, held)
        self._tell(record)
        log.info(
            "round=%d %s accuracy=%s loss=%s down=%.2fMB up=%.2fMB %.1fs",
            round_num,
            status,
            _figure(record.global_accuracy),
            _figure(record.global_loss),
            bytes_down / 1e6,
            bytes_up / 1e6,
            seconds,
        )
        spreads = {
            s.silo_id: v
            for s in silos
            if isinstance(v := s.train_metrics.get("train_pool_spread"), int | float)
        }
        if line := collapsed_pools(spreads):
            log.warning("round=%d %s", round_num, line)

    def _silo_status(self, silo: str, missing: list[str]) -> str:
        """A round's record status for a silo without a result in it."""
        if silo not in missing:
            return "idle"
        return "failed" if silo in self._failed else "missing"

    def _finish(self, grace_s: float = 10.0) -> None:
        """Tell every live silo the run is over (they exit on DONE), waiting a little."""
        end = time.monotonic() + grace_s
        with self._cond:
            self._phase = "done"
            self._cond.notify_all()
            while time.monotonic() < end:
                pending = [s for s in self._alive(time.monotonic()) if not self._silos[s].told_done]
                if not pending:
                    break
                self._cond.wait(0.2)


def _metric_clash(metrics: Iterable[str]) -> str | None:
    """A metric whose record key (``train_<name>``) is one of the record's own fields."""
    fields = {f.name for f in dataclasses.fields(SiloRound)}
    for name in metrics:
        key = name if name.startswith("train_") else f"train_{name}"
        if key in fields:
            return f"metric {name!r} would overwrite the record's {key}"
    return None


def update_norm(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``state - base`` over the floating-point tensors, summed in float64."""
    total = 0.0
    for name, ref in base.items():
        if ref.is_floating_point():
            diff = state[name].to(torch.float64) - ref.to(torch.float64)
            total += float(torch.sum(diff * diff))
    return total**0.5


def _statistics_names(model_spec: dict[str, Any]) -> frozenset[str]:
    """The model's floating buffers, from a model built on the meta device (nothing
    allocated); none when a site's builder cannot build there."""
    try:
        with torch.device("meta"):
            return statistics_names(build_model(model_spec))
    except Exception:  # a site's builder may load files or refuse the meta device
        log.debug("model built on the meta device failed", exc_info=True)
        return frozenset()


def _figure(value: float | None) -> str:
    """A logged accuracy or loss; "pending" while the silos have yet to measure it."""
    return "pending" if value is None else f"{value:.4f}"
