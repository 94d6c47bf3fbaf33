"""SiloDaemon: dials out to the coordinator, trains on private data, uploads the result.

The data never leaves this process; only state dicts travel. If the coordinator is away
(restart, network cut) the daemon retries with exponential backoff and joins again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from torch import Tensor

from lssfl import __version__
from lssfl.common.codecs import CodecError, ErrorFeedback, parse_codec
from lssfl.common.config import ConfigError
from lssfl.common.faults import crash_point
from lssfl.common.logs import one_line
from lssfl.common.models import build_model, evaluate, statistics_names
from lssfl.common.peertext import MAX_PEER_REASON, peer_text
from lssfl.common.plugins import check_allowed, is_import_path
from lssfl.common.progress import progress
from lssfl.common.rpc import CHANNEL_OPTIONS, coordinator_stub
from lssfl.common.security import SILO_HEADER, TOKEN_HEADER, channel_credentials, read_secret
from lssfl.common.seeding import seed_of
from lssfl.common.tls_errors import TlsMisconfigured, explain_connect_failure
from lssfl.common.wire import (
    FP32,
    DecodedModel,
    Outgoing,
    WireError,
    decode_model,
    pack_state,
    stream_tensors,
)
from lssfl.dataprep.silodata import (
    ImageTransform,
    LazyImages,
    SiloData,
    as_tensor,
    check_num_classes,
    open_silo_data,
    subset,
)
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.training.spec import trainer_spec
from lssfl.training.trainers import make_trainer

log = logging.getLogger("lssfl.silo")
T = TypeVar("T")
Images = Tensor | LazyImages

# Answers after which the silo asks again (with backoff) instead of stopping: the coordinator is
# unreachable or slow, or it turned a call away for now: a stream cancelled by its watchdog or
# its round's close (CANCELLED), a silo over its per-peer bounds (RESOURCE_EXHAUSTED), a call
# cut short (ABORTED). A daemon next to a dataset outlives them all.
RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
)
# Defaults of `lssfl silo --max-epochs / --max-model-mb`: what a task may ask of this silo.
MAX_EPOCHS = 1000
MAX_MODEL_MB = 4096.0


def _with_crash_point(messages: Iterator[Outgoing], tag: str) -> Iterator[Outgoing]:
    """The fault tests kill a silo here, with part of its upload on the wire."""
    for i, msg in enumerate(messages):
        if i == 3:
            crash_point(tag)
        yield msg


class SiloRefused(RuntimeError):
    """The coordinator will not work with this silo (unknown id, revoked...)."""


class CoordinatorUnreachable(RuntimeError):
    """The coordinator did not answer within the silo's ``max_wait``."""

    pass


class _Rejoin(Exception):
    """The coordinator forgot us (restart, new run): join again."""


class TaskRefused(Exception):
    """This silo will not or cannot do the task; the message is one line saying why."""


def _said(exc: grpc.RpcError) -> str:
    """The coordinator's message in a refusal, escaped and bounded for our log."""
    return peer_text(exc.details() or exc.code().name, MAX_PEER_REASON)


def check_task(
    task: cpb.Task, allowed_plugins: Collection[str], max_epochs: int, max_model_mb: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's model spec and trainer spec, every field checked against this silo's limits;
    TaskRefused (one line) for a field a coordinator should never send: unparsable JSON, an
    unknown or oversized model, a trainer parameter of the wrong type or out of bounds, too
    many epochs, an unknown codec. PluginNotAllowed (the silo stops) for an import path its
    command line does not allow, before anything is imported."""
    try:
        model_spec = json.loads(task.model_json)
        trainer = json.loads(task.trainer_json)
    except ValueError as exc:
        raise TaskRefused(
            f"task JSON does not parse: {peer_text(one_line(exc, typed=True), 300)}"
        ) from None
    if not isinstance(model_spec, dict) or not isinstance(trainer, dict):
        raise TaskRefused("task model and trainer must be JSON objects")
    check_allowed(str(model_spec.get("name")), allowed_plugins, "model")
    check_allowed(str(trainer.get("name")), allowed_plugins, "trainer")
    try:
        spec = trainer_spec(trainer)
        parse_codec(task.uplink_codec or "fp32")
        if not is_import_path(str(model_spec.get("name"))):
            # On the meta device: an architecture of 10^12 parameters is refused unallocated.
            # (A site's own model, allowed by its operator, is bounded by its download.)
            with torch.device("meta"):
                meta_model = build_model(model_spec)
            sizes = (t.numel() * t.element_size() for t in meta_model.state_dict().values())
            model_mb = sum(sizes) / 2**20
            if model_mb > max_model_mb:
                raise TaskRefused(
                    f"model of {model_mb:.0f} MB exceeds --max-model-mb {max_model_mb:g}"
                )
    except (ValueError, TypeError, ConfigError, CodecError) as exc:
        raise TaskRefused(peer_text(" ".join(str(exc).split()), 300)) from None
    for key, value in spec.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TaskRefused(f"trainer.{key} is {value}, not a finite number")
    if "batch_size" in spec and spec["batch_size"] < 1:
        raise TaskRefused(f"trainer.batch_size must be >= 1, got {spec['batch_size']}")
    if "epochs" in spec and spec["epochs"] < 1:
        raise TaskRefused(f"trainer.epochs must be >= 1, got {spec['epochs']}")
    # Plain trainers run `epochs`; a trainer with a schedule of its own (LSS) says how many.
    local_epochs = getattr(make_trainer(spec), "local_epochs", None)
    epochs = local_epochs() if callable(local_epochs) else spec.get("epochs", 1)
    if epochs > max_epochs:
        raise TaskRefused(
            f"task asks for {epochs} local epochs, more than --max-epochs {max_epochs}"
        )
    return model_spec, spec


def check_received(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """TaskRefused unless ``state`` has exactly the model's tensors, shapes and dtypes."""
    expected = model.state_dict()
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))[0]
        raise TaskRefused(
            f"received model does not fit the task's architecture (tensor {peer_text(odd)!r})"
        )
    for name, ref in expected.items():
        t = state[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise TaskRefused(
                f"received tensor {name!r} is {t.dtype} {list(t.shape)}, the model has "
                f"{ref.dtype} {list(ref.shape)}"
            )


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device`` (auto: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


class SiloDaemon:
    """One silo: joins, polls for tasks, trains its private data, uploads."""

    def __init__(
        self,
        coordinator: str,
        silo_id: str,
        data: SiloData,
        device: torch.device,
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
        self.allowed_plugins = frozenset(allowed_plugins)
        self.max_epochs = max_epochs
        self.max_model_mb = max_model_mb
        self._refused: tuple[str, int] | None = None  # (run, round) this silo gave up on
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
        self._held: tuple[int, dict[str, torch.Tensor]] | None = None
        self._feedback = ErrorFeedback()
        on_device = data.to(device)
        self._x, self._y = on_device.x, on_device.y
        self._own_test = on_device.test
        # Evaluation at the silos: (the task's evaluation_json, train x, y, held-out x, y).
        self._eval_split: tuple[str, Images, Tensor, Images, Tensor] | None = None

    def _split_for(self, evaluation_json: str) -> tuple[Images, Tensor, Images, Tensor]:
        """(train x, y, held-out x, y) under the task's evaluation settings: the silo's own
        test split when it has one, else a fraction of its data drawn from (run seed, silo)."""
        if self._eval_split is not None and self._eval_split[0] == evaluation_json:
            return self._eval_split[1:]
        settings = _evaluation_settings(evaluation_json)
        if self._own_test is not None:
            test = self._own_test
            split = (self._x, self._y, test.x, test.y)
        else:
            n = len(self._y)
            generator = torch.Generator().manual_seed(
                seed_of("holdout", settings["seed"], self.silo_id)
            )
            order = torch.randperm(n, generator=generator)
            cut = min(n - 1, max(1, round(settings["holdout"] * n)))
            held, train = order[:cut].sort().values, order[cut:].sort().values
            split = (
                subset(self._x, train),
                self._y[train.to(self.device)],
                subset(self._x, held),
                self._y[held.to(self.device)],
            )
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
        ``transform`` and ``workers``: for an image folder (lssfl.common.silodata)."""
        data = open_silo_data(data_dir, classes, transform, workers)
        credentials = channel_credentials(ca, cert, key)
        token = read_secret(token_file, "token file").decode().strip() if token_file else None
        return cls(
            coordinator,
            silo_id,
            data,
            resolve_device(device),
            max_wait_s,
            credentials,
            token,
            (ca, cert, key),
            allowed_plugins,
            max_epochs,
            max_model_mb,
        )

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it answers; backoff while the coordinator is unreachable."""
        delay, since = 0.5, time.monotonic()
        suspected: str | None = None
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    raise SiloRefused(_said(exc)) from None
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    raise _Rejoin(_said(exc)) from None
                if code not in RETRY_CODES:
                    raise
                if self._tls_files is not None:
                    problem = explain_connect_failure(self.address, exc.details(), *self._tls_files)
                    # Twice in a row: a coordinator caught mid-restart does not end a silo.
                    if problem and problem == suspected:
                        raise TlsMisconfigured(problem) from None
                    suspected = problem
                waited = time.monotonic() - since
                if waited > self.max_wait_s:
                    raise CoordinatorUnreachable(
                        f"coordinator {self.address} unreachable for {waited:.0f} s ({what})"
                    ) from None
                log.warning(
                    "silo=%s %s: %s; retrying in %.1f s",
                    self.silo_id,
                    what,
                    suspected
                    or (
                        f"coordinator unavailable ({code.name})"
                        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                        else f"{code.name}: {_said(exc)}"
                    ),
                    delay,
                )
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

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
                raise SiloRefused(_said(exc)) from None
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
            while True:
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
                        return
                    if task.kind == cpb.Task.TRAIN:
                        if self._refused == (task.run_id, task.round):
                            time.sleep(1.0)  # already said why; wait for the next round
                            continue
                        try:
                            self.train_round(task)
                        except TaskRefused as exc:
                            self._refuse(task, str(exc))
                    elif task.kind == cpb.Task.EVALUATE:
                        self.evaluate_final(task)
                except WireError as exc:
                    # A stream that does not decode (or a delta against a model we no longer
                    # hold): forget the held model and ask again for the whole one.
                    log.warning("silo=%s round=%d bad download: %s", self.silo_id, self.round, exc)
                    self._held = None
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
                        _said(exc),
                    )
                    time.sleep(1.0)
                except _Rejoin as exc:
                    log.warning("silo=%s %s; joining again", self.silo_id, exc)
                    self.join()
        finally:
            # Join the heartbeat thread before closing the channel: a gRPC call still in
            # flight at interpreter exit aborts the process ("terminate called ...").
            self._stop.set()
            if beat.is_alive():
                beat.join()
            self._channel.close()

    def _refuse(self, task: cpb.Task, reason: str) -> None:
        """Say in one line why this round's task is not done, and tell the coordinator so
        that it stops waiting for this silo; the daemon then waits for the next task."""
        log.error("round=%d silo=%s task refused: %s", task.round, self.silo_id, reason)
        self._refused = (task.run_id, task.round)
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

    def _download(self, task: cpb.Task, keep: bool = True) -> DecodedModel:
        """This round's model; only the change when we still hold the previous round's.
        ``keep``: hold it as the base of the next delta (not the final model's evaluation,
        which is sent whole and is not what a resumed run's next round is a delta to)."""
        held_round, held = self._held if self._held and keep else (None, None)
        request = cpb.DownloadRequest(silo_id=self.silo_id, run_id=task.run_id, round=task.round)
        if held_round is not None:
            request.have_round = held_round
        stream = self._stub.DownloadModel(request, timeout=600, metadata=self._metadata)
        received = decode_model(
            progress(stream, 0, f"round {task.round} download", " messages"),
            header_kind="download",
            max_payload_bytes=int(self.max_model_mb * 2**20),
            reference=held,
        )
        head = received.header.download
        if head.HasField("base_round") and head.base_round != held_round:
            raise WireError(f"delta against round {head.base_round}, we hold {held_round}")
        if keep:
            self._held = (task.round, received.state)
        return received

    def _model(self, model_spec: dict[str, Any], received: DecodedModel) -> torch.nn.Module:
        """The task's model with the received weights, checked against this silo's labels."""
        model = build_model(model_spec)
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        check_num_classes(self.data, heads[-1].out_features if heads else None)
        check_received(received.state, model)
        model.load_state_dict(received.state)
        return model.to(self.device)

    def _measure(self, model: torch.nn.Module, task: cpb.Task) -> pb.Evaluation:
        """``model`` (as received) on this silo's held-out data."""
        _, _, x, y = self._split_for(task.evaluation_json)
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

    def evaluate_final(self, task: cpb.Task) -> None:
        """EVALUATE: download the final model, measure it, report the figures."""
        model_spec = json.loads(task.model_json)  # checked before downloading, as for TRAIN
        if not isinstance(model_spec, dict):
            raise ValueError(f"round {task.round}: the task's model spec is not a JSON object")
        check_allowed(str(model_spec.get("name")), self.allowed_plugins, "model")
        try:
            received = self._download(task, keep=False)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.warning(
                    "round=%d silo=%s download refused: %s", task.round, self.silo_id, exc.details()
                )
                return
            raise
        model = self._model(model_spec, received)
        report = cpb.EvaluationReport(
            silo_id=self.silo_id,
            run_id=task.run_id,
            round=task.round,
            evaluation=self._measure(model, task),
        )
        try:
            self._stub.ReportEvaluation(report, timeout=30, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() not in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                raise
            log.warning(
                "round=%d silo=%s evaluation refused: %s", task.round, self.silo_id, exc.details()
            )

    def train_round(self, task: cpb.Task) -> None:
        """Download the round's model, train it locally, upload the result."""
        r = self.round = task.round
        # Before a byte is downloaded: the names come from the coordinator, and importing a
        # module runs its code.
        model_spec, trainer_params = check_task(
            task, self.allowed_plugins, self.max_epochs, self.max_model_mb
        )
        t0 = time.monotonic()
        self.state = "downloading"
        try:
            received = self._download(task)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.warning("round=%d silo=%s download refused: %s", r, self.silo_id, _said(exc))
                return
            raise
        except WireError as exc:
            if self._held is not None:
                raise  # perhaps a delta against a model we no longer hold: the loop retries
            raise TaskRefused(f"bad model download: {peer_text(str(exc), 300)}") from None
        t1 = time.monotonic()
        log.info(
            "round=%d silo=%s downloaded %.2f MB in %.2f s",
            r,
            self.silo_id,
            received.payload_bytes / 1e6,
            t1 - t0,
        )

        self.state = "training"
        model = self._model(model_spec, received)
        x, y, evaluation = self._x, self._y, None
        if task.evaluation_json:
            x, y, _, _ = self._split_for(task.evaluation_json)
            evaluation = self._measure(model, task)
        trainer = make_trainer(trainer_params)
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
                f"trainer {trainer_params.get('name')!r} must return a dict of metric name -> "
                f"number, got {peer_text(str(metrics), 200)}"
            )
        t2 = time.monotonic()
        log.info(
            "round=%d silo=%s trained %s on %d samples in %.2f s: %s",
            r,
            self.silo_id,
            trainer_params.get("name"),
            len(y),
            t2 - t1,
            " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
        )

        self.state = "uploading"
        header = pb.ModelChunk(
            upload=pb.UploadHeader(
                run_id=task.run_id,
                round=r,
                silo_id=self.silo_id,
                num_samples=len(y),
                train_seconds=t2 - t1,
                metrics=metrics,
                evaluation=evaluation,
            )
        )
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        codec = parse_codec(task.uplink_codec or "fp32")
        if codec.topk is not None:
            self._feedback.start_round(r)
        # Lossy codecs send the update against what was received: small, centred values.
        # Top-k keeps what it dropped for the next round (error feedback).
        tensors = (
            pack_state(state)
            if codec == FP32
            else pack_state(
                state,
                codec,
                received.state,
                self._feedback if codec.topk is not None else None,
                exact=statistics_names(model),
            )
        )
        try:
            reply = self._stub.UploadResult(
                progress(
                    _with_crash_point(stream_tensors(tensors, header), f"upload:{r}"),
                    0,
                    f"round {r} upload",
                    " messages",
                ),
                timeout=600,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            if exc.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                log.warning("round=%d silo=%s upload refused: %s", r, self.silo_id, _said(exc))
                return
            raise
        finally:
            self.state = "idle"
        log.info(
            "round=%d silo=%s uploaded in %.2f s: %s",
            r,
            self.silo_id,
            time.monotonic() - t2,
            reply.message,
        )


def _evaluation_settings(text: str) -> dict[str, Any]:
    """The task's evaluation_json, checked: {"holdout": fraction in (0, 1), "seed": int}.
    The coordinator may be hostile too: anything else stops the silo with one line."""
    try:
        settings = json.loads(text)
        holdout, seed = settings["holdout"], settings["seed"]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"task evaluation_json {text[:200]!r} is not valid") from None
    if not (isinstance(holdout, float) and 0.0 < holdout < 1.0) or not isinstance(seed, int):
        raise ValueError(f"task evaluation_json {text[:200]!r} is out of range")
    return {"holdout": holdout, "seed": seed}
