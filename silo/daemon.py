"""SiloDaemon: dials out to the coordinator, trains on private data, uploads the result.

The data never leaves this process; only state dicts travel. If the coordinator is away
(restart, network cut) the daemon retries with exponential backoff and joins again. Every
task goes the same way: checked (lssfl.silo.task), its model fetched, trained or measured,
the result published.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import torch
from torch import Tensor

from lssfl import __version__
from lssfl.common.faults import crash_point
from lssfl.common.logs import one_line
from lssfl.common.models import build_model, evaluate, statistics_names
from lssfl.common.peertext import MAX_PEER_REASON, peer_text
from lssfl.common.pipeline import HeldModel, UplinkEncoder
from lssfl.common.progress import progress
from lssfl.common.rpc import CHANNEL_OPTIONS, coordinator_stub
from lssfl.common.security import SILO_HEADER, TOKEN_HEADER, channel_credentials, read_secret
from lssfl.common.wire import DecodedModel, Outgoing, WireError, stream_tensors
from lssfl.dataprep.silodata import (
    ImageTransform,
    SiloData,
    as_tensor,
    check_num_classes,
    open_silo_data,
)
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.silo.holdout import Images, drawn_split, evaluation_settings
from lssfl.silo.link import (
    RETRY_CODES,
    CoordinatorUnreachable,
    Rejoin,
    SiloRefused,
    call_with_backoff,
    peer_reason,
)
from lssfl.silo.task import CheckedTask, SiloLimits, TaskRefused, check_received, check_task

__all__ = ["CoordinatorUnreachable", "SiloDaemon", "SiloRefused", "TaskRefused"]

log = logging.getLogger("lssfl.silo")
T = TypeVar("T")

# Answers to a download, upload or report that end this task only: the round moved on, or
# the coordinator will not take it.
TURNED_AWAY = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
# Defaults of `lssfl silo --max-epochs / --max-model-mb`: what a task may ask of this silo.
MAX_EPOCHS = 1000
MAX_MODEL_MB = 4096.0


def _with_crash_point(messages: Iterator[Outgoing], tag: str) -> Iterator[Outgoing]:
    """The fault tests kill a silo here, with part of its upload on the wire."""
    for i, msg in enumerate(messages):
        if i == 3:
            crash_point(tag)
        yield msg


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device`` (auto: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


@dataclass
class Trained:
    """What a TRAIN task's local work leaves to publish."""

    model: torch.nn.Module
    metrics: dict[str, float]
    num_samples: int
    seconds: float
    evaluation: pb.Evaluation | None


class SiloDaemon:
    """One silo: joins, polls for tasks, trains its private data, uploads."""

    def __init__(
        self,
        coordinator: str,
        silo_id: str,
        data: SiloData,
        device: torch.device,
        *,
        max_wait_s: float = 300.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls_files: tuple[Path | None, Path | None, Path | None] | None = None,
        allowed_plugins: Collection[str] = (),
        max_epochs: int = MAX_EPOCHS,
        max_model_mb: float = MAX_MODEL_MB,
    ) -> None:
        """``tls_files``: the (ca, cert, key) paths behind ``credentials`` (None each for
        plaintext), to explain a failed handshake; None: not known, not explained.
        ``allowed_plugins``: the import paths (model or trainer) a task may name; a task
        naming another one ends the silo with PluginNotAllowed (lssfl.common.plugins).
        ``max_epochs`` and ``max_model_mb`` bound what a task may ask of this silo."""
        self.address = coordinator
        self.limits = SiloLimits(frozenset(allowed_plugins), max_epochs, max_model_mb)
        # (run, round, kind) of the task this silo gave up on
        self._refused: tuple[str, int, int] | None = None
        self._tls_files = tls_files
        self.silo_id = silo_id
        self.data = data
        self.device = device
        self.max_wait_s = max_wait_s
        self.run_id = ""
        self.round = 0
        self.state = "idle"
        self.heartbeat_s = 2.0
        self._metadata: tuple[tuple[str, str], ...] = (
            (SILO_HEADER, silo_id),
            *(((TOKEN_HEADER, f"Bearer {token}"),) if token else ()),
        )
        self._channel = (
            grpc.secure_channel(coordinator, credentials, options=CHANNEL_OPTIONS)
            if credentials
            else grpc.insecure_channel(coordinator, options=CHANNEL_OPTIONS)
        )
        self._stub = coordinator_stub(self._channel)
        self._stop = threading.Event()
        self.held_model = HeldModel()  # the base of the next download's delta
        self._uplink = UplinkEncoder()  # top-k's residuals, carried between rounds
        on_device = data.to(device)
        self._x, self._y = on_device.x, on_device.y
        self._own_test = on_device.test
        # Evaluation at the silos: (the task's evaluation_json, train x, y, held-out x, y).
        self._eval_split: tuple[str, Images, Tensor, Images, Tensor] | None = None

    def split_for(self, evaluation_json: str) -> tuple[Images, Tensor, Images, Tensor]:
        """(train x, y, held-out x, y) under the task's evaluation settings: the silo's own
        test split when it has one, else a fraction of its data drawn from (run seed, silo)."""
        if self._eval_split is not None and self._eval_split[0] == evaluation_json:
            return self._eval_split[1:]
        settings = evaluation_settings(evaluation_json)
        if self._own_test is not None:
            split = (self._x, self._y, self._own_test.x, self._own_test.y)
        else:
            split = drawn_split(self._x, self._y, settings=settings, silo_id=self.silo_id)
        log.info(
            "silo=%s evaluates on %d held-out samples (%s), trains on %d",
            self.silo_id,
            len(split[3]),
            "its own test split" if self._own_test is not None else "drawn from its data",
            len(split[1]),
        )
        self._eval_split = (evaluation_json, *split)
        return split

    @classmethod
    def from_folder(
        cls,
        coordinator: str,
        silo_id: str,
        data_dir: Path,
        device: str = "auto",
        *,
        max_wait_s: float = 300.0,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        token_file: Path | None = None,
        classes: Path | None = None,
        transform: ImageTransform | None = None,
        workers: int = 4,
        allowed_plugins: Collection[str] = (),
        max_epochs: int = MAX_EPOCHS,
        max_model_mb: float = MAX_MODEL_MB,
    ) -> SiloDaemon:
        """Build from paths, validating each; errors name the file at fault. ``classes``,
        ``transform`` and ``workers``: for an image folder (lssfl.dataprep.silodata)."""
        data = open_silo_data(data_dir, classes, transform, workers)
        credentials = channel_credentials(ca, cert, key)
        token = read_secret(token_file, "token file").decode().strip() if token_file else None
        return cls(
            coordinator,
            silo_id,
            data,
            resolve_device(device),
            max_wait_s=max_wait_s,
            credentials=credentials,
            token=token,
            tls_files=(ca, cert, key),
            allowed_plugins=allowed_plugins,
            max_epochs=max_epochs,
            max_model_mb=max_model_mb,
        )

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it answers; backoff while the coordinator is unreachable."""
        return call_with_backoff(
            what,
            fn,
            address=self.address,
            silo_id=self.silo_id,
            max_wait_s=self.max_wait_s,
            tls_files=self._tls_files,
        )

    def join(self) -> None:
        """Join the run (retrying while the coordinator is unreachable); SiloRefused when
        the coordinator will not have this silo or its data."""
        request = cpb.JoinRequest(
            silo_id=self.silo_id,
            num_samples=self.data.num_samples,
            device=str(self.device),
            version=__version__,
            sample_shape=list(self.data.x[0:1].shape[1:]) if self.data.num_samples else [],
            num_classes=self.data.num_classes,
        )
        try:
            reply = self._retry(
                "join",
                lambda: self._stub.Join(request, timeout=30, metadata=self._metadata),
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise SiloRefused(peer_reason(exc)) from None
            raise
        # Both come from the coordinator: a run id for our logs, an interval we obey.
        self.run_id = reply.run_id
        interval = reply.heartbeat_interval_s
        finite = interval and math.isfinite(interval)
        self.heartbeat_s = min(max(interval, 0.1), 60.0) if finite else 2.0
        log.info(
            "silo=%s joined run %s at %s (%d samples, %s, on %s)",
            self.silo_id,
            peer_text(self.run_id),
            self.address,
            self.data.num_samples,
            self.data.kind,
            self.device,
        )

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            # The main loop notices a lost coordinator and rejoins; a missed beat is harmless.
            with contextlib.suppress(grpc.RpcError):
                self._stub.Heartbeat(
                    cpb.HeartbeatRequest(
                        silo_id=self.silo_id, run_id=self.run_id, round=self.round, state=self.state
                    ),
                    timeout=max(self.heartbeat_s, 1.0),
                    metadata=self._metadata,
                )

    def run(self) -> None:
        """Serve tasks until the coordinator says the run is done."""
        beat = threading.Thread(target=self._heartbeats, name="heartbeat")
        try:
            self.join()
            beat.start()
            while self._serve_next():
                pass
        finally:
            # Join the heartbeat thread before closing the channel: a gRPC call still in
            # flight at interpreter exit aborts the process ("terminate called ...").
            self._stop.set()
            if beat.is_alive():
                beat.join()
            self.close()

    def close(self) -> None:
        """Close the channel to the coordinator (``run`` does when it returns)."""
        self._channel.close()

    def _serve_next(self) -> bool:
        """Ask for the next task and do it; False once the run is over."""
        try:
            task = self._retry(
                "get task",
                lambda: self._stub.GetTask(
                    cpb.TaskRequest(silo_id=self.silo_id, run_id=self.run_id),
                    timeout=30,
                    metadata=self._metadata,
                ),
            )
            if task.kind == cpb.Task.DONE:
                log.info("silo=%s run %s is over", self.silo_id, peer_text(task.run_id))
                return False
            self._do(task)
        except WireError as exc:
            # A stream that does not decode (or a delta against a model we no longer
            # hold): forget the held model and ask again for the whole one.
            log.warning("silo=%s round=%d bad download: %s", self.silo_id, self.round, exc)
            self.held_model.forget()
            time.sleep(1.0)
        except grpc.RpcError as exc:
            if exc.code() not in RETRY_CODES:
                raise
            # Lost the coordinator mid-round, or it cut a stream short: ask again; if
            # the round is still open it hands out the same task.
            log.warning(
                "silo=%s round=%d interrupted: %s: %s",
                self.silo_id,
                self.round,
                exc.code().name,
                peer_reason(exc),
            )
            time.sleep(1.0)
        except Rejoin as exc:
            log.warning("silo=%s %s; joining again", self.silo_id, exc)
            self.join()
        return True

    def _do(self, task: cpb.Task) -> None:
        """A TRAIN or EVALUATE task, refused in one line when it cannot be done."""
        if task.kind not in (cpb.Task.TRAIN, cpb.Task.EVALUATE):
            return
        if self._refused == (task.run_id, task.round, task.kind):
            time.sleep(1.0)  # already said why; wait for the next task
            return
        try:
            if task.kind == cpb.Task.TRAIN:
                self.train_round(task)
            else:
                self.evaluate_final(task)
        except TaskRefused as exc:
            self._refuse(task, str(exc))

    def _refuse(self, task: cpb.Task, reason: str) -> None:
        """Say in one line why this task is not done, and tell the coordinator so that it
        stops waiting for this silo; the daemon then waits for the next task."""
        log.error("round=%d silo=%s task refused: %s", task.round, self.silo_id, reason)
        self._refused = (task.run_id, task.round, task.kind)
        self.state = "idle"
        with contextlib.suppress(grpc.RpcError):  # the coordinator's deadline still holds
            self._stub.ReportFailure(
                cpb.FailureReport(
                    silo_id=self.silo_id,
                    run_id=task.run_id,
                    round=task.round,
                    reason=reason[:MAX_PEER_REASON],
                ),
                timeout=10,
                metadata=self._metadata,
            )

    # ------------------------------------------------------------------ fetch

    def _fetch(self, task: cpb.Task, *, keep: bool) -> DecodedModel | None:
        """This round's model (only the change when we hold the previous round's); None when
        the coordinator turned the download away. ``keep``: hold it as the base of the next
        delta (not the final model's evaluation, which is sent whole and is not what a resumed
        run's next round is a delta to)."""
        request = cpb.DownloadRequest(silo_id=self.silo_id, run_id=task.run_id, round=task.round)
        base = self.held_model.base_round(keep)
        if base is not None:
            request.have_round = base
        started = time.monotonic()
        try:
            stream = self._stub.DownloadModel(request, timeout=600, metadata=self._metadata)
            received = self.held_model.decode(
                progress(stream, 0, f"round {task.round} download", " messages"),
                round_num=task.round,
                keep=keep,
                max_payload_bytes=int(self.limits.max_model_mb * 2**20),
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning(
                "round=%d silo=%s download refused: %s", task.round, self.silo_id, peer_reason(exc)
            )
            return None
        except WireError as exc:
            if not keep or self.held_model.state is not None:
                raise  # perhaps a delta against a model we no longer hold: the loop retries
            raise TaskRefused(f"bad model download: {peer_text(str(exc), 300)}") from None
        log.info(
            "round=%d silo=%s downloaded %.2f MB in %.2f s",
            task.round,
            self.silo_id,
            received.payload_bytes / 1e6,
            time.monotonic() - started,
        )
        return received

    def _model(self, model_spec: dict[str, object], received: DecodedModel) -> torch.nn.Module:
        """The task's model with the received weights, checked against this silo's labels."""
        model = build_model(model_spec)
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        check_num_classes(self.data, heads[-1].out_features if heads else None)
        check_received(received.state, model)
        model.load_state_dict(received.state)
        return model.to(self.device)

    # ------------------------------------------------------------------ evaluate or train

    def _measure(self, model: torch.nn.Module, task: cpb.Task) -> pb.Evaluation:
        """``model`` (as received) on this silo's held-out data."""
        _, _, x, y = self.split_for(task.evaluation_json)
        with torch.no_grad():
            accuracy, loss = evaluate(model, as_tensor(x), y)
        log.info(
            "round=%d silo=%s received model: accuracy=%.4f loss=%.4f on %d held-out samples",
            task.round,
            self.silo_id,
            accuracy,
            loss,
            len(y),
        )
        return pb.Evaluation(loss=loss, accuracy=accuracy, num_samples=len(y))

    def train(self, checked: CheckedTask, model: torch.nn.Module, started: float) -> Trained:
        """Train ``model`` in place with the task's trainer (the one ``check_task`` built)
        on this silo's training data; its held-out part measures the model first.
        ``started``: when the local work began (the model's building included)."""
        task, trainer = checked.task, checked.trainer
        assert trainer is not None  # a TRAIN task's
        x, y, evaluation = self._x, self._y, None
        if task.evaluation_json:
            x, y, _, _ = self.split_for(task.evaluation_json)
            evaluation = self._measure(model, task)
        torch.manual_seed(task.seed)
        try:
            metrics = trainer.train(model, as_tensor(x), y, seed=task.seed)
        except Exception as exc:  # data that does not fit the model, a trainer bug...
            log.debug("training failed", exc_info=True)
            raise TaskRefused(
                f"local training failed: {peer_text(one_line(exc, typed=True), 300)}"
            ) from None
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in metrics.items()
        ):
            raise TaskRefused(
                f"trainer {checked.trainer_name!r} must return a dict of metric name -> "
                f"number, got {peer_text(str(metrics), 200)}"
            )
        return Trained(model, metrics, len(y), time.monotonic() - started, evaluation)

    def evaluate_final(self, task: cpb.Task) -> None:
        """EVALUATE: check the task, download the final model, measure it, report."""
        checked = check_task(task, self.limits)  # before a byte is downloaded
        received = self._fetch(task, keep=False)
        if received is None:
            return
        model = self._model(checked.model_spec, received)
        report = cpb.EvaluationReport(
            silo_id=self.silo_id,
            run_id=task.run_id,
            round=task.round,
            evaluation=self._measure(model, task),
        )
        try:
            self._stub.ReportEvaluation(report, timeout=30, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() not in TURNED_AWAY:
                raise
            log.warning(
                "round=%d silo=%s evaluation refused: %s", task.round, self.silo_id, exc.details()
            )

    def train_round(self, task: cpb.Task) -> None:
        """TRAIN: check the task, download the round's model, train it locally, upload."""
        self.round = task.round
        # Before a byte is downloaded: the names come from the coordinator, and importing a
        # module runs its code.
        checked = check_task(task, self.limits)
        self.state = "downloading"
        received = self._fetch(task, keep=True)
        if received is None:
            return
        self.state = "training"
        started = time.monotonic()
        trained = self.train(checked, self._model(checked.model_spec, received), started)
        log.info(
            "round=%d silo=%s trained %s on %d samples in %.2f s: %s",
            task.round,
            self.silo_id,
            checked.trainer_name,
            trained.num_samples,
            trained.seconds,
            " ".join(f"{k}={v:.4g}" for k, v in trained.metrics.items()),
        )
        self.state = "uploading"
        try:
            self._publish(checked, received, trained)
        finally:
            self.state = "idle"

    # ------------------------------------------------------------------ publish

    def _publish(self, checked: CheckedTask, received: DecodedModel, trained: Trained) -> None:
        """Upload the trained model under the task's codec (lssfl.common.pipeline)."""
        task, r = checked.task, checked.task.round
        started = time.monotonic()
        header = pb.ModelChunk(
            upload=pb.UploadHeader(
                run_id=task.run_id,
                round=r,
                silo_id=self.silo_id,
                num_samples=trained.num_samples,
                train_seconds=trained.seconds,
                metrics=trained.metrics,
                evaluation=trained.evaluation,
            )
        )
        state = {k: v.detach().cpu() for k, v in trained.model.state_dict().items()}
        tensors = self._uplink.encode(
            state,
            checked.uplink_codec,
            received=received.state,
            exact=statistics_names(trained.model),
            round_num=r,
        )
        messages = _with_crash_point(stream_tensors(tensors, header), f"upload:{r}")
        try:
            reply = self._stub.UploadResult(
                progress(messages, 0, f"round {r} upload", " messages"),
                timeout=600,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            if exc.code() not in TURNED_AWAY:
                raise
            log.warning("round=%d silo=%s upload refused: %s", r, self.silo_id, peer_reason(exc))
            return
        log.info(
            "round=%d silo=%s uploaded in %.2f s: %s",
            r,
            self.silo_id,
            time.monotonic() - started,
            reply.message,
        )
