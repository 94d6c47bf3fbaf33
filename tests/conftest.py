# ruff: noqa: E402
import os

# Several processes share two cores in these tests: one thread each avoids oversubscription
# (inherited by every coordinator and silo the tests start).
os.environ["OMP_NUM_THREADS"] = "1"
# Set before anything imports torch (the Harness's imports below do), which reads it once.

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from lssfl.common.config import parse_config
from lssfl.common.rpc import CHANNEL_OPTIONS, coordinator_stub
from lssfl.common.wire import decode_model, encode_model
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.coordinator import Coordinator
from lssfl.server.service import serve
from lssfl.server.store import RoundStore


def lssfl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lssfl", *args]


def run_lssfl(*args: str, timeout: float = 120, cwd: Path | None = None):
    return subprocess.run(
        lssfl_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_config(folder: Path, name: str = "run.yaml", **sections) -> Path:
    """Write a small, fast run config into folder; sections are merged into the defaults."""
    cfg = {
        "run": {"name": "t", "seed": 0, "rounds": 2, "out_dir": str(folder / "runs")},
        "silos": ["silo-1", "silo-2", "silo-3"],
        "coordinator": {"min_silos": 2, "round_deadline_s": 60, "join_timeout_s": 60,
                        "heartbeat_interval_s": 0.5},
        "data": {"kind": "embedded", "root": str(folder / "data")},
        "model": {"name": "cnn", "init": "pretrain", "pretrain_epochs": 2},
        "trainer": {"name": "fedavg", "epochs": 1, "lr": 0.003},
    }  # fmt: skip
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def write_config(tmp_path):
    def write(name: str = "run.yaml", **sections) -> Path:
        return make_config(tmp_path, name, **sections)

    return write


class Harness:
    """A coordinator serving on a loopback port, and a client stub to it."""

    def __init__(
        self,
        tmp_path,
        state,
        silos=("s1", "s2"),
        deadline=30.0,
        compression=None,
        security=None,
        credentials=None,
        evaluation=None,
        rounds=3,
        **coordinator,
    ):
        cfg = parse_config(
            {
                "silos": list(silos),
                "coordinator": {"min_silos": 1, "round_deadline_s": deadline, **coordinator},
                "model": {"name": "mlp", "init": "random"},
                "data": {"kind": "folders"},
                "compression": compression or {},
                "security": security or {},
                "evaluation": evaluation or {},
                "run": {"rounds": rounds},
            }
        )
        self.store = RoundStore(tmp_path)
        evaluate = None if cfg.evaluation.where == "silos" else lambda s: (0.0, 0.0)
        self.coordinator = Coordinator(cfg, self.store, state, evaluate, run_id="run1")
        self.server, self.port = serve(self.coordinator, "127.0.0.1", 0)
        target = f"127.0.0.1:{self.port}"
        self.channel = (
            grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
            if credentials
            else grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        )
        self.stub = coordinator_stub(self.channel)
        self.thread = None

    def join(self, *silos):
        for s in silos:
            self.stub.Join(cpb.JoinRequest(silo_id=s, num_samples=10), timeout=5)

    def open_round(self, round_num=1):
        def run_round():
            with contextlib.suppress(KeyboardInterrupt):  # what stop() raises mid-round
                self.coordinator.run_round(round_num)

        self.thread = threading.Thread(target=run_round)
        self.thread.start()
        task = self.stub.GetTask(cpb.TaskRequest(silo_id="s1", run_id="run1"), timeout=10)
        assert task.kind == cpb.Task.TRAIN and task.round == round_num
        return task

    def download(self, silo="s1", round_num=1):
        stream = self.stub.DownloadModel(
            cpb.DownloadRequest(silo_id=silo, run_id="run1", round=round_num), timeout=60
        )
        return decode_model(stream, header_kind="download", max_payload_bytes=1 << 31)

    def upload(self, state, silo="s1", round_num=1, messages=None):
        header = pb.ModelChunk(
            upload=pb.UploadHeader(run_id="run1", round=round_num, silo_id=silo, num_samples=10)
        )
        msgs = messages if messages is not None else encode_model(state, header)
        return self.stub.UploadResult(iter(msgs), timeout=60)

    def close(self):
        self.coordinator.stop()
        if self.thread:
            self.thread.join(10)
        self.channel.close()
        self.server.stop(0).wait()


def status_of(call):
    """The status code and details of the gRPC error ``call()`` raises."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()
