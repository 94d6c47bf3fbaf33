"""Bounds on what one peer can hold of the coordinator: streams per peer, idle streams, the
round's close, upload sizes and room, over a real loopback socket in this process."""

import logging
import threading
import time

import grpc
import pytest
import torch

from lssfl.common.rpc import CHANNEL_OPTIONS, coordinator_stub
from lssfl.common.security import SILO_HEADER
from lssfl.common.wire import (
    CHUNK_BYTES,
    data_message,
    decode_model,
    encode_model,
)
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.streams import STREAMS_PER_SILO
from tests.conftest import Harness, read_jsonl


def _as(silo):
    return ((SILO_HEADER, silo),)


def _header(silo, round_num=1):
    return pb.ModelChunk(
        upload=pb.UploadHeader(run_id="run1", round=round_num, silo_id=silo, num_samples=10)
    )


def _download(stub, silo):
    stream = stub.DownloadModel(
        cpb.DownloadRequest(silo_id=silo, run_id="run1", round=1), timeout=30, metadata=_as(silo)
    )
    return decode_model(stream, header_kind="download", max_payload_bytes=1 << 30)


def _upload(stub, state, silo):
    return stub.UploadResult(encode_model(state, _header(silo)), timeout=30, metadata=_as(silo))


def _silent(release: threading.Event, first=()):
    yield from first
    release.wait()


def status_of(future, timeout=20):
    exc = future.exception(timeout=timeout)
    return exc.code() if exc is not None else grpc.StatusCode.OK


def test_silent_and_unread_streams_do_not_stop_honest_silos(tmp_path, caplog):
    # 8 MB: far more than a stream's flow-control window, so an unread download blocks.
    state = {"w": torch.randn(2_000_000), "n": torch.tensor(3)}
    h = Harness(tmp_path, state, deadline=60, stream_idle_timeout_s=1.0)
    attacker = grpc.insecure_channel(f"127.0.0.1:{h.port}", options=CHANNEL_OPTIONS)
    stub = coordinator_stub(attacker)
    release = threading.Event()
    try:
        h.join("s1", "s2")
        h.open_round()
        # Twice the server's threads in silent uploads, and downloads nobody reads, from
        # callers that name no silo; then the same from a caller claiming to be s2.
        silent = [stub.UploadResult.future(_silent(release), timeout=30) for _ in range(40)]
        unread = [
            stub.DownloadModel(cpb.DownloadRequest(silo_id="s1", run_id="run1", round=1))
            for _ in range(6)
        ]
        claimed = [
            stub.UploadResult.future(_silent(release), timeout=30, metadata=_as("s2"))
            for _ in range(STREAMS_PER_SILO + 3)
        ]
        codes = [status_of(f) for f in silent + claimed]
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        # Beyond their bounds refused at once; within them cancelled once idle.
        assert refused >= len(codes) - 4 - STREAMS_PER_SILO, codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        assert "no message for" in caplog.text
        # The honest silos, meanwhile: their round completes, before its deadline.
        for silo in ("s1", "s2"):
            got = _download(h.stub, silo)
            assert _upload(h.stub, got.state, silo).accepted
        h.thread.join(30)
        record = read_jsonl(h.store.metrics_path)[-1]
        assert record["status"] == "ok" and record["num_results"] == 2 and not record["missing"]
        for call in unread:
            with pytest.raises(grpc.RpcError) as info:
                list(call)  # what the server sent before giving up, then its verdict
            assert info.value.code() in (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.CANCELLED,
            )
    finally:
        release.set()
        attacker.close()
        h.close()


def test_a_slow_drip_upload_is_cancelled_when_its_round_closes(tmp_path, caplog):
    state = {"w": torch.randn(64), "n": torch.tensor(3)}
    h = Harness(
        tmp_path, state, deadline=60, stream_idle_timeout_s=1.0, silos_per_round=1, over_select=1
    )
    sent = []

    def drip():
        yield _header("s2")
        yield pb.ModelChunk(
            tensor=pb.TensorSpec(name="w", dtype="float32", shape=[64], codec="raw", nbytes=256)
        )
        for _ in range(256):  # a byte every 0.2 s: never idle for a second
            time.sleep(0.2)
            sent.append(1)
            yield data_message(b"\0")

    try:
        h.join("s1", "s2")
        h.open_round()
        slow = h.stub.UploadResult.future(drip(), timeout=60, metadata=_as("s2"))
        while len(sent) < 3:
            time.sleep(0.05)
        got = _download(h.stub, "s1")
        assert _upload(h.stub, got.state, "s1").accepted  # the round's one result: it closes
        assert status_of(slow) == grpc.StatusCode.CANCELLED
        assert len(sent) < 100  # cut off, not read to its end 50 s later
        assert "upload of silo s2" in caplog.text and "cancelled: its round closed" in caplog.text
    finally:
        h.close()


def test_an_upload_read_whole_is_not_cancelled_by_the_round_it_closed(tmp_path):
    """The last upload of a round closes it; while the coordinator still writes what that
    upload changed (a slow disk), the watchdog sees its round closed. The silo, whose upload
    was read whole and accepted, gets its reply, not CANCELLED."""
    state = {"w": torch.randn(64), "n": torch.tensor(3)}
    h = Harness(tmp_path, state, deadline=60, stream_idle_timeout_s=0.4, silos_per_round=1)
    put = h.store.put

    def slow_put(**values):
        if "reported" in values:
            time.sleep(1.5)  # several looks of the watchdog (every 0.1 s here)
        put(**values)

    h.store.put = slow_put
    try:
        h.join("s1")
        h.open_round()
        reply = _upload(h.stub, _download(h.stub, "s1").state, "s1")
        assert reply.accepted
        h.thread.join(10)
        assert h.coordinator.rounds_closed == 1
    finally:
        h.close()


def test_an_oversized_tensor_is_refused_after_its_spec_before_its_data(tmp_path):
    state = {"w": torch.randn(8, 80), "n": torch.tensor(3)}  # 2.5 KB
    h = Harness(tmp_path, state, deadline=60)
    pulled = []

    def huge():
        yield _header("s1")
        # 512 MiB announced for a 2.5 KB tensor, within max_upload_mb.
        yield pb.ModelChunk(
            tensor=pb.TensorSpec(
                name="w", dtype="float32", shape=[2**27], codec="raw", nbytes=2**29
            )
        )
        piece = bytes(CHUNK_BYTES)
        for _ in range(2**29 // CHUNK_BYTES):
            pulled.append(1)
            yield data_message(piece)

    try:
        h.join("s1", "s2")
        h.open_round()
        with pytest.raises(grpc.RpcError) as info:
            h.stub.UploadResult(huge(), timeout=60, metadata=_as("s1"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tensor 'w' announced with shape [134217728], expected [8, 80]" in (
            info.value.details()
        )
        # Refused on its spec: what the coordinator read of it stops at gRPC's buffers.
        assert h.coordinator.meter.get(1, "s1", "up").bytes < 64 * CHUNK_BYTES
        assert len(pulled) < 64
    finally:
        h.close()


def test_uploads_beyond_the_in_flight_room_wait_for_it(tmp_path, caplog):
    state = {"w": torch.randn(256, 256), "n": torch.tensor(3)}  # 256 KiB: room for one upload
    h = Harness(tmp_path, state, deadline=60, max_inflight_upload_mb=0.3)
    caplog.set_level(logging.INFO, "lssfl.coordinator")
    first_started, go_on = threading.Event(), threading.Event()

    def held(messages):
        for i, msg in enumerate(messages):
            if i == 3:  # header, spec and one chunk sent: the upload holds the room
                first_started.set()
                go_on.wait(20)
            yield msg

    try:
        h.join("s1", "s2")
        h.open_round()
        got = _download(h.stub, "s1")
        first = h.stub.UploadResult.future(
            held(encode_model(got.state, _header("s1"))), timeout=30, metadata=_as("s1")
        )
        assert first_started.wait(10)
        second = h.stub.UploadResult.future(
            encode_model(got.state, _header("s2")), timeout=30, metadata=_as("s2")
        )
        with pytest.raises(grpc.FutureTimeoutError):
            second.result(timeout=1.0)  # waits for the room the first upload holds
        go_on.set()
        assert first.result(timeout=20).accepted and second.result(timeout=20).accepted
        accepted = [line for line in caplog.text.splitlines() if "upload accepted" in line]
        assert ["silo=s1" in line for line in accepted] == [True, False]
    finally:
        go_on.set()
        h.close()


def test_unary_calls_whose_request_never_comes_do_not_stop_honest_silos(tmp_path):
    """gRPC runs a unary handler only once its one request arrived, and waits for it on a
    server thread: a caller that opens Heartbeat, GetTask or Join calls and never sends the
    request holds that thread. Sixty such calls (three times the server's threads), from a
    caller naming s2 and from one naming no silo, hold only their own callers' threads; s1's
    round completes."""
    state = {"w": torch.randn(64), "n": torch.tensor(3)}
    h = Harness(tmp_path, state, deadline=60, silos_per_round=1)
    attacker = grpc.insecure_channel(f"127.0.0.1:{h.port}", options=CHANNEL_OPTIONS)
    release = threading.Event()
    stalled = []
    try:
        h.join("s1", "s2")
        for i in range(60):
            method = ("Heartbeat", "GetTask", "Join")[i % 3]
            call = attacker.stream_unary(
                f"/lssfl.v1.Coordinator/{method}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=cpb.HeartbeatReply.FromString,
            )
            metadata = _as("s2") if i % 2 else ()
            stalled.append(call.future(_silent(release), timeout=60, metadata=metadata))
        time.sleep(1.0)  # every stalled call has reached the server
        h.thread = threading.Thread(target=h.coordinator.run_round, args=(1,))
        h.thread.start()
        task = h.stub.GetTask(
            cpb.TaskRequest(silo_id="s1", run_id="run1"), timeout=10, metadata=_as("s1")
        )
        assert task.kind == cpb.Task.TRAIN
        got = _download(h.stub, "s1")
        assert _upload(h.stub, got.state, "s1").accepted
        h.thread.join(30)
        assert read_jsonl(h.store.metrics_path)[-1]["num_results"] == 1
    finally:
        release.set()
        attacker.close()
        h.close()
