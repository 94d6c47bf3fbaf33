"""The coordinator's gRPC service, in this process, over a real loopback socket."""

import threading
import time

import grpc
import pytest
import torch

from lssfl.common.codecs import parse_codec
from lssfl.common.rpc import SERVICE
from lssfl.common.wire import encode_model, pack_state, parse_chunk, stream_tensors
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.store import RoundStore, state_bytes
from tests.conftest import Harness, read_jsonl, status_of


@pytest.fixture
def small(tmp_path):
    state = {"w": torch.randn(8, 4), "n": torch.tensor(3)}
    h = Harness(tmp_path, state)
    yield h, state
    h.close()


def test_model_larger_than_50_mb_goes_down_and_up_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(13_500_000, generator=g),  # 54 MB, 13x gRPC's default limit
        "half": torch.randn(1000, generator=g).half(),
        "steps": torch.tensor(41),
    }
    h = Harness(tmp_path, state, silos=("s1",))
    try:
        h.join("s1")
        h.open_round()
        got = h.download()
        assert got.payload_bytes > 50 * 2**20
        for k, v in state.items():
            assert got.state[k].dtype == v.dtype and torch.equal(got.state[k], v), k
        assert h.upload(got.state).accepted
        h.thread.join(30)
        # One silo, weight 1: the new global model is exactly what came back up.
        for k, v in state.items():
            assert torch.equal(h.coordinator.global_state[k], v), k
        down = h.coordinator.meter.get(1, "s1", "down")
        up = h.coordinator.meter.get(1, "s1", "up")
        assert 0 < down.bytes - got.payload_bytes < 10_000
        assert 0 < up.bytes - got.payload_bytes < 10_000
        assert up.raw == down.raw == 54_000_000 + 4000 + 8
    finally:
        h.close()


def test_unknown_silo_is_refused_and_logged(small, caplog):
    h, _ = small
    code, details = status_of(lambda: h.stub.Join(cpb.JoinRequest(silo_id="mallory"), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "mallory" in details
    code, _ = status_of(lambda: h.stub.GetTask(cpb.TaskRequest(silo_id="mallory"), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "unknown silo 'mallory'" in caplog.text


def test_calls_before_join_are_refused(small):
    h, _ = small
    code, details = status_of(lambda: h.stub.GetTask(cpb.TaskRequest(silo_id="s1"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "join first" in details


def _bad_uploads(state):
    header = pb.ModelChunk(
        upload=pb.UploadHeader(run_id="run1", round=1, silo_id="s1", num_samples=10)
    )
    good = list(encode_model(state, header))
    corrupt = list(good)
    corrupt[2] = pb.ModelChunk(data=b"\x00" * len(parse_chunk(good[2]).data))
    return {
        "wrong shape": ({"w": torch.zeros(4, 8), "n": state["n"]}, None, "shape"),
        "wrong dtype": ({"w": state["w"].double(), "n": state["n"]}, None, "dtype"),
        "nan": ({"w": torch.full((8, 4), float("nan")), "n": state["n"]}, None, "NaN"),
        "unknown name": ({**state, "extra": torch.ones(1)}, None, "unknown tensor 'extra'"),
        "missing name": ({"w": state["w"]}, None, "missing tensor 'n'"),
        "truncated": (None, good[:-2], "bad upload stream"),
        "checksum": (None, corrupt, "checksum"),
        "no header": (None, good[1:], "header"),
    }


def test_bad_uploads_are_refused_and_the_round_still_completes(small, caplog):
    h, state = small
    h.join("s1", "s2")
    h.open_round()
    for case, (bad_state, msgs, reason) in _bad_uploads(state).items():
        code, details = status_of(lambda: h.upload(bad_state, messages=msgs))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT, case
        assert reason in details, (case, details)
        assert f"rejected upload: {details.removeprefix('bad upload stream: ')}" in caplog.text
    # Still serving, and the good results make the round.
    assert h.upload({"w": torch.ones(8, 4), "n": torch.tensor(5)}).accepted
    # A second upload from s1 with other values is acknowledged and ignored: the first stays.
    again = h.upload({"w": 100 * torch.ones(8, 4), "n": torch.tensor(99)})
    assert again.accepted and again.message == "duplicate upload ignored"
    assert h.upload({"w": 3 * torch.ones(8, 4), "n": torch.tensor(7)}, silo="s2").accepted
    h.thread.join(10)
    assert torch.equal(h.coordinator.global_state["w"], 2 * torch.ones(8, 4))
    assert int(h.coordinator.global_state["n"]) == 6


def test_results_for_a_closed_round_are_refused_and_counted(small):
    h, state = small
    evaluating, release = threading.Event(), threading.Event()

    def slow_evaluate(_state):
        evaluating.set()
        release.wait(10)
        return 0.0, 0.0

    h.coordinator.evaluate = slow_evaluate
    h.join("s1", "s2")
    h.open_round()
    h.upload(state)
    h.upload(state, silo="s2")
    assert evaluating.wait(10)
    # Closed but not yet recorded: counted in round 1's own record.
    code, details = status_of(lambda: h.upload(state, round_num=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "round 1 is closed" in details
    release.set()
    h.thread.join(10)
    assert [r["late_refused"] for r in read_jsonl(h.store.metrics_path)] == [1]
    # Once recorded, a round's record is not rewritten: refused, counted nowhere.
    code, details = status_of(lambda: h.upload(state, round_num=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "round 1 is closed" in details
    # A round not yet open: refused as such, not late.
    code, details = status_of(lambda: h.upload(state, round_num=7))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "round 7 is not open" in details
    assert h.coordinator.late_refused(1) == 1
    code, _ = status_of(lambda: h.download(round_num=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_standard_health_service_reports_serving(small):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h, _ = small
    stub = health_pb2_grpc.HealthStub(h.channel)
    for service in ("", "lssfl.v1.Coordinator"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    code, _ = status_of(
        lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_replayed_upload_from_an_earlier_round_is_refused(small):
    h, state = small
    h.join("s1", "s2")
    h.open_round(1)
    h.upload(state)
    h.upload(state, silo="s2")
    h.thread.join(10)
    h.open_round(2)
    # s1 replays its round-1 upload while round 2 is open: refused, not aggregated.
    code, details = status_of(lambda: h.upload(state, round_num=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "round 1 is closed" in details
    assert h.coordinator.accepted() == []
    h.upload({"w": torch.ones(8, 4), "n": torch.tensor(5)}, round_num=2)
    h.upload({"w": torch.ones(8, 4), "n": torch.tensor(5)}, silo="s2", round_num=2)
    h.thread.join(10)
    # Not counted as late in round 2: round 2's silos were on time.
    records = read_jsonl(h.store.metrics_path)
    assert [(r["round"], r["late_refused"]) for r in records] == [(1, 0), (2, 0)]
    assert torch.equal(h.coordinator.global_state["w"], torch.ones(8, 4))


def test_over_selection_uses_the_first_k_results(tmp_path):
    state = {"w": torch.zeros(3)}
    h = Harness(tmp_path, state, silos=("s1", "s2", "s3"), silos_per_round=1, over_select=1)
    try:
        h.join("s1", "s2", "s3")
        h.thread = threading.Thread(target=h.coordinator.run_round, args=(1,))
        h.thread.start()
        _wait = time.monotonic() + 10
        while not h.coordinator.selected() and time.monotonic() < _wait:
            time.sleep(0.01)
        selected = h.coordinator.selected()
        assert len(selected) == 2
        first, second = selected
        assert h.upload({"w": torch.ones(3)}, silo=first).accepted
        h.thread.join(10)
        assert not h.thread.is_alive()  # closed on the first result, no deadline wait
        assert torch.equal(h.coordinator.global_state["w"], torch.ones(3))
        code, details = status_of(lambda: h.upload({"w": torch.ones(3)}, silo=second))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "closed" in details
    finally:
        h.close()


def test_round_with_fewer_than_min_silos_keeps_the_model_and_is_recorded_insufficient(tmp_path):
    state = {"w": torch.randn(8, 4), "n": torch.tensor(3)}
    h = Harness(tmp_path, state, min_silos=2, deadline=1.0)
    try:
        h.join("s1", "s2")
        h.open_round()
        assert h.upload({"w": torch.ones(8, 4), "n": torch.tensor(5)}).accepted
        h.thread.join(30)  # s2 never answers: the round closes at its deadline
        assert not h.thread.is_alive()
    finally:
        h.close()
    checkpoint = h.store.checkpoint_path(1).read_bytes()
    assert checkpoint == state_bytes(state, {"round": "1"})  # the initial model, byte for byte
    (record,) = read_jsonl(h.store.metrics_path)
    assert record["status"] == "insufficient" and record["num_results"] == 1
    assert record["missing"] == ["s2"]
    assert [(s["silo_id"], s["status"]) for s in record["silos"]] == [
        ("s1", "ok"),
        ("s2", "missing"),
    ]


def test_upload_over_max_upload_mb_is_refused_by_the_service(tmp_path):
    state = {"w": torch.zeros(64, 64)}  # 16 KiB of fp32
    h = Harness(tmp_path, state, silos=("s1",), max_upload_mb=0.01)
    try:
        h.join("s1")
        h.open_round()
        code, details = status_of(lambda: h.upload({"w": torch.ones(64, 64)}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "stream exceeds the size limit" in details
        assert h.coordinator.accepted() == []
        # Still serving: the same values as an int8 update (4 KiB + scales) fit the limit.
        header = pb.ModelChunk(
            upload=pb.UploadHeader(run_id="run1", round=1, silo_id="s1", num_samples=10)
        )
        update = pack_state({"w": torch.ones(64, 64)}, parse_codec("int8"), state)
        assert h.upload(None, messages=stream_tensors(update, header)).accepted
        h.thread.join(10)
        assert torch.equal(h.coordinator.global_state["w"], torch.ones(64, 64))
    finally:
        h.close()


def test_each_round_is_encoded_once_and_every_silo_gets_the_same_bytes(tmp_path, monkeypatch):
    import lssfl.common.pipeline as pipeline_module

    encodes = []
    real_pack_state = pipeline_module.pack_state

    def counting_pack_state(*args, **kwargs):
        encodes.append(args[1].name if len(args) > 1 else "fp32")
        return real_pack_state(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "pack_state", counting_pack_state)
    silos = ("s1", "s2", "s3")
    state = {"w": torch.randn(64, 32), "n": torch.tensor(3)}
    compression = {"downlink": "int8", "delta_downlink": True}
    h = Harness(tmp_path, state, silos=silos, compression=compression)

    def raw_download(silo, round_num, have_round=None):
        """The download's messages as the bytes that arrived."""
        call = h.channel.unary_stream(
            f"/{SERVICE}/DownloadModel",
            request_serializer=cpb.DownloadRequest.SerializeToString,
            response_deserializer=bytes,
        )
        request = cpb.DownloadRequest(silo_id=silo, run_id="run1", round=round_num)
        if have_round is not None:
            request.have_round = have_round
        return list(call(request, timeout=10))

    try:
        h.join(*silos)
        h.open_round(1)
        assert encodes == ["fp32"]  # round 1: nobody holds a model yet, so only the whole one
        first = [raw_download(s, 1) for s in silos]
        assert first[0] == first[1] == first[2]
        for s in silos:
            assert h.upload({"w": torch.ones(64, 32), "n": torch.tensor(4)}, silo=s).accepted
        h.thread.join(10)
        h.open_round(2)
        # Round 2: the change against round 1 (int8) and the whole model for silos without it.
        assert encodes == ["fp32", "int8", "fp32"]
        deltas = [raw_download(s, 2, have_round=1) for s in silos]
        whole = raw_download("s1", 2)
        assert deltas[0] == deltas[1] == deltas[2] != whole
        assert encodes == ["fp32", "int8", "fp32"]  # downloads encoded nothing more
    finally:
        h.close()


def test_held_model_is_stored_with_its_round_and_checked_on_read(tmp_path):
    from lssfl.common.records import RoundRecord
    from lssfl.server.store import StoreError

    store = RoundStore(tmp_path)
    record = {
        "status": "ok", "algorithm": "fedavg", "global_accuracy": 0.0, "global_loss": 0.0,
        "bytes_down": 0, "bytes_down_raw": 0, "bytes_down_payload": 0, "bytes_up": 0,
        "bytes_up_raw": 0, "bytes_up_payload": 0, "cum_bytes_down": 0, "cum_bytes_up": 0,
        "codec_down": "fp32", "codec_up": "fp32", "delta_downlink": True, "wall_seconds": 0.0,
        "num_results": 0, "missing": [], "late_refused": 0, "silos": [],
    }  # fmt: skip
    for r in (1, 2):
        held = {"w": torch.full((3,), float(r))}
        store.commit_round(
            {"w": torch.zeros(3)}, RoundRecord.from_dict({**record, "round": r}), held
        )
    # Only the last round's is kept, and only it is read back.
    assert not store.held_path(1).exists() and store.held_model(1) is None
    assert torch.equal(store.held_model(2)["w"], torch.full((3,), 2.0))
    data = bytearray(store.held_path(2).read_bytes())
    data[-1] ^= 0xFF
    store.held_path(2).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="held-0002.safetensors does not match its recorded"):
        store.held_model(2)
    store.close()
