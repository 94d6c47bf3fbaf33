"""A silo served by a hostile (or broken) coordinator: a real gRPC server in this process
hands the real SiloDaemon crafted tasks and model streams, one per round. The silo refuses
each in one line, reports it with ReportFailure, and keeps serving until DONE."""

import json
import logging
import threading
from concurrent import futures

import grpc
import pytest
import torch

from lssfl.common.models import build_model
from lssfl.common.rpc import add_coordinator_servicer
from lssfl.common.wire import pack_state, stream_tensors
from lssfl.dataprep.silodata import SiloData
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import coordinator_pb2_grpc as cgrpc
from lssfl.proto import tensor_pb2 as pb
from lssfl.silo.daemon import SiloDaemon

MODEL = {"name": "mlp", "in_features": 48, "hidden": 4, "num_classes": 2}
TRAINER = {"name": "fedavg", "epochs": 1, "batch_size": 4}


def _model_stream(round_num, state):
    header = pb.ModelChunk(download=pb.DownloadHeader(run_id="r", round=round_num))
    return list(stream_tensors(pack_state(state), header))


def _huge_stream(round_num):
    # Declares 2^40 bytes of float32 for one tensor: refused before any allocation.
    spec = pb.TensorSpec(
        name="net.1.weight", dtype="float32", shape=[2**38], codec="raw", nbytes=2**40
    )
    header = pb.ModelChunk(download=pb.DownloadHeader(run_id="r", round=round_num))
    return [header, pb.ModelChunk(tensor=spec)]


class HostileCoordinator(cgrpc.CoordinatorServicer):
    """Serves ``rounds`` in order (one task and model stream each), then DONE."""

    def __init__(self, rounds):
        self.rounds = rounds
        self.current = 0
        self.failures = {}
        self.uploads = []
        self.joins = []
        self.lock = threading.Lock()

    def Join(self, request, context):
        self.joins.append(request)
        # A negative interval would make the silo's heartbeat thread spin.
        return cpb.JoinReply(run_id="r", heartbeat_interval_s=-5.0)

    def GetTask(self, request, context):
        with self.lock:
            if self.current >= len(self.rounds):
                return cpb.Task(kind=cpb.Task.DONE, run_id="r")
            model, trainer, _ = self.rounds[self.current]
            return cpb.Task(
                kind=cpb.Task.TRAIN,
                run_id="r",
                round=self.current + 1,
                seed=1,
                model_json=json.dumps(model),
                trainer_json=json.dumps(trainer),
                uplink_codec="fp32",
            )

    def DownloadModel(self, request, context):
        yield from self.rounds[request.round - 1][2](request.round)

    def UploadResult(self, request_iterator, context):
        messages = list(request_iterator)
        with self.lock:
            self.uploads.append(messages[0].upload.round)
            self.current += 1
        return cpb.UploadReply(accepted=True, message="ok")

    def Heartbeat(self, request, context):
        return cpb.HeartbeatReply(current_round=self.current + 1)

    def ReportFailure(self, request, context):
        with self.lock:
            self.failures[request.round] = request.reason
            self.current = max(self.current, request.round)
        return cpb.FailureReply()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return SiloData(torch.randn(8, 3, 4, 4, generator=g), torch.arange(8) % 2, 2, "test")


def _serve(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    add_coordinator_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_silo_refuses_hostile_tasks_in_one_line_and_keeps_serving(data, caplog):
    caplog.set_level(logging.INFO, "lssfl.silo")
    good = build_model(MODEL).state_dict()
    wrong = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in good.items()}
    other_data = {**MODEL, "in_features": 12}  # the model does not take this silo's samples

    def stream(state):
        return lambda r: _model_stream(r, state)

    rounds = [
        (MODEL, {**TRAINER, "epochs": 1e9}, stream(good)),
        (MODEL, {**TRAINER, "epochs": 10**9}, stream(good)),
        (MODEL, {**TRAINER, "epochs": 2.5}, stream(good)),
        (MODEL, {**TRAINER, "batch_size": 0}, stream(good)),
        (MODEL, {**TRAINER, "batch_size": -3}, stream(good)),
        (MODEL, {**TRAINER, "lr": float("nan")}, stream(good)),
        ({**MODEL, "hidden": 10**9}, TRAINER, stream(good)),
        (MODEL, TRAINER, _huge_stream),
        (MODEL, TRAINER, stream(wrong)),
        (other_data, TRAINER, stream(build_model(other_data).state_dict())),
        (MODEL, TRAINER, stream(good)),  # an honest round: trained and uploaded
    ]
    hostile = HostileCoordinator(rounds)
    server, port = _serve(hostile)
    daemon = SiloDaemon(
        f"127.0.0.1:{port}", "s1", data, torch.device("cpu"), max_wait_s=10, max_model_mb=64
    )
    try:
        thread = threading.Thread(target=daemon.run)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        server.stop(0).wait()
    assert hostile.joins[0].sample_shape == [3, 4, 4] and hostile.joins[0].num_classes == 2
    assert daemon.heartbeat_s == 0.1
    reasons = hostile.failures
    assert sorted(reasons) == list(range(1, 11)) and hostile.uploads == [11]
    assert "trainer.epochs must be an integer, got 1000000000.0" in reasons[1]
    assert reasons[2] == "task asks for 1000000000 local epochs, more than --max-epochs 1000"
    assert "trainer.epochs must be an integer, got 2.5" in reasons[3]
    assert reasons[4] == "trainer.batch_size must be >= 1, got 0"
    assert reasons[5] == "trainer.batch_size must be >= 1, got -3"
    assert reasons[6] == "trainer.lr is nan, not a finite number"
    assert reasons[7].startswith("model of ") and "exceeds --max-model-mb 64" in reasons[7]
    assert reasons[8].startswith("bad model download: tensor 'net.1.weight'")
    assert "stream exceeds the size limit" in reasons[8]
    assert reasons[9].startswith("received tensor 'net.1.weight' is torch.float32 [5, 48]")
    assert reasons[10].startswith("local training failed: RuntimeError: mat1 and mat2")
    refused = [r.getMessage() for r in caplog.records if "task refused" in r.getMessage()]
    assert len(refused) == 10 and all("\n" not in m for m in refused)
    assert not any(r.exc_info for r in caplog.records)


class TurningAway(HostileCoordinator):
    """Turns each kind of call away once (as the real coordinator's bounds and stream
    watchdog do) before serving it."""

    def __init__(self, rounds):
        super().__init__(rounds)
        self.turned: list[str] = []

    def _once(self, what, code, context):
        if what not in self.turned:
            self.turned.append(what)
            context.abort(code, f"{what} turned away for now")

    def GetTask(self, request, context):
        self._once("task", grpc.StatusCode.RESOURCE_EXHAUSTED, context)
        return super().GetTask(request, context)

    def DownloadModel(self, request, context):
        self._once("download", grpc.StatusCode.CANCELLED, context)
        yield from super().DownloadModel(request, context)

    def UploadResult(self, request_iterator, context):
        self._once("upload", grpc.StatusCode.ABORTED, context)
        return super().UploadResult(request_iterator, context)


def test_silo_asks_again_after_a_call_turned_away(data, caplog):
    """Over its per-peer bounds, or with a stream cancelled by the coordinator's watchdog, a
    silo backs off and asks again; it does not stop."""
    caplog.set_level(logging.INFO, "lssfl.silo")
    good = build_model(MODEL).state_dict()
    coordinator = TurningAway([(MODEL, TRAINER, lambda r: _model_stream(r, good))])
    server, port = _serve(coordinator)
    daemon = SiloDaemon(f"127.0.0.1:{port}", "s1", data, torch.device("cpu"), max_wait_s=10)
    errors: list[BaseException] = []

    def run():
        try:
            daemon.run()
        except BaseException as exc:
            errors.append(exc)

    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        server.stop(0).wait()
    assert errors == []
    assert coordinator.turned == ["task", "download", "upload"]
    assert coordinator.uploads == [1] and coordinator.failures == {}
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("RESOURCE_EXHAUSTED: task turned away for now" in m for m in said), said
    assert any("interrupted: CANCELLED: download turned away for now" in m for m in said), said
    assert any("interrupted: ABORTED: upload turned away for now" in m for m in said), said


@pytest.mark.parametrize(
    ("trainer", "epochs"),
    [
        ({"name": "lss", "pool_size": 10**12}, 8 * 10**12),  # counted, never looped over
        ({"name": "lss", "pool_size": 200, "exclude_head": True}, 8 + 200 * 8),
        ({"name": "lss-paper", "pool_size": 2000, "schedule": "authors"}, 8 + 1999),
    ],
)
def test_an_lss_task_is_counted_in_local_epochs_before_it_runs(trainer: dict, epochs: int):
    from lssfl.silo.task import SiloLimits, TaskRefused, check_task

    task = cpb.Task(model_json=json.dumps(MODEL), trainer_json=json.dumps(trainer))
    with pytest.raises(TaskRefused, match=f"task asks for {epochs} local epochs, more than"):
        check_task(task, SiloLimits(frozenset(), max_epochs=1000, max_model_mb=64))


@pytest.mark.parametrize(
    ("model_json", "reason"),
    [
        ("[1, 2]", "task model and trainer must be JSON objects"),
        ("{", "task JSON does not parse"),
        (json.dumps({"name": "resnet50", "num_classes": 10**6}), "exceeds --max-model-mb 64"),
        (json.dumps({"name": "vgg"}), "unknown model 'vgg'"),
    ],
)
def test_an_evaluate_task_is_checked_like_a_train_task(model_json: str, reason: str):
    from lssfl.silo.task import SiloLimits, TaskRefused, check_task

    limits = SiloLimits(frozenset(), max_epochs=1000, max_model_mb=64)
    for kind in (cpb.Task.EVALUATE, cpb.Task.TRAIN):
        task = cpb.Task(kind=kind, model_json=model_json, trainer_json=json.dumps(TRAINER))
        with pytest.raises(TaskRefused, match=reason):
            check_task(task, limits)
    evaluate = cpb.Task(kind=cpb.Task.EVALUATE, model_json=json.dumps(MODEL))
    assert check_task(evaluate, limits).trainer is None  # nothing to train: no trainer asked
