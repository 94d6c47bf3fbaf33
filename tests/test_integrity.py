"""What one bad silo can send the coordinator: weights, strings, metrics, failures, silence.
Each test runs the real service in this process over a loopback socket."""

import logging
import threading
import time

import grpc
import pytest
import torch

from lssfl.common.peertext import peer_text
from lssfl.common.rpc import coordinator_stub
from lssfl.common.runfolder import read_status
from lssfl.common.wire import MAX_MESSAGE_BYTES, encode_model
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from tests.conftest import Harness, read_jsonl, status_of


def _upload(h, state, silo="s1", round_num=1, **header):
    head = pb.UploadHeader(run_id="run1", round=round_num, silo_id=silo, **header)
    return h.stub.UploadResult(iter(encode_model(state, pb.ModelChunk(upload=head))), timeout=30)


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(state, **kwargs):
        h = Harness(tmp_path, state, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_upload_weight_is_bounded_by_what_the_silo_declared_at_join(harness):
    state = {"w": torch.ones(4)}
    h = harness(state, max_num_samples=1000)
    h.join("s1", "s2")  # 10 samples each
    h.open_round()
    zeros = {"w": torch.zeros(4)}
    for weight in (2**62, 11, 0):
        code, details = status_of(lambda w=weight: _upload(h, zeros, num_samples=w))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"num_samples {weight} is not in [1, 10] (declared at Join)" in details
    assert _upload(h, {"w": 3 * torch.ones(4)}, num_samples=10).accepted
    assert _upload(h, {"w": torch.ones(4)}, silo="s2", num_samples=10).accepted
    h.thread.join(10)
    # The attacker's zeros never entered the average.
    assert torch.equal(h.coordinator.global_state["w"], 2 * torch.ones(4))
    # Nor can a silo declare an absurd count at Join.
    code, details = status_of(
        lambda: h.stub.Join(cpb.JoinRequest(silo_id="s2", num_samples=2**62), timeout=5)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_num_samples" in details


def test_update_norm_bound_refuses_finite_but_absurd_weights(harness):
    state = {"w": torch.zeros(4), "n": torch.tensor(3)}
    h = harness(state, silos=("s1",), max_update_norm=10.0)
    h.join("s1")
    h.open_round()
    code, details = status_of(
        lambda: _upload(h, {"w": torch.full((4,), 1e38), "n": torch.tensor(3)}, num_samples=10)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "update norm 2e+38 exceeds coordinator.max_update_norm 10"
    # Integer buffers do not count; an update of norm 2 does.
    assert _upload(h, {"w": torch.ones(4), "n": torch.tensor(900)}, num_samples=10).accepted
    h.thread.join(10)
    assert torch.equal(h.coordinator.global_state["w"], torch.ones(4))


def test_unauthenticated_identities_are_announced_at_start(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "lssfl.service")
    h = Harness(tmp_path, {"w": torch.zeros(2)})
    h.close()
    assert any("NOT authenticated" in r.getMessage() for r in caplog.records)


def test_peer_strings_are_escaped_and_bounded_in_log_and_store(harness, tmp_path, caplog):
    caplog.set_level(logging.INFO, "lssfl")
    h = harness({"w": torch.zeros(4)})
    forged = "cpu\n2026-01-01 INFO lssfl.coordinator run finished\x1b[2J"
    h.stub.Join(
        cpb.JoinRequest(silo_id="s1", num_samples=10, device=forged, version="x" * 3 * 2**20),
        timeout=10,
    )
    h.stub.Heartbeat(cpb.HeartbeatRequest(silo_id="s1", run_id="run1", state="y" * 5000))
    joined = [r.getMessage() for r in caplog.records if "joined" in r.getMessage()]
    assert len(joined) == 1 and "\n" not in joined[0] and "\x1b" not in joined[0]
    assert "cpu\\n2026-01-01" in joined[0] and len(joined[0]) < 400
    (row,) = read_status(tmp_path)["silos"]
    device = row["device"]
    assert device == peer_text(forged) and len(device) <= 128
    # An unknown id is escaped too.
    code, details = status_of(
        lambda: h.stub.Join(cpb.JoinRequest(silo_id="evil\nid" * 1000, num_samples=1), timeout=5)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "\n" not in details
    assert len(details) < 250


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({f"m{i}": 1.0 for i in range(33)}, "33 metrics, at most 32"),
        ({"train_loss": float("nan")}, "metric 'train_loss' is nan, not a finite number"),
        ({"loss\ninjected": 1.0}, "is empty, too long or unprintable"),
        ({"seconds": 1.0}, "metric 'seconds' would overwrite the record's train_seconds"),
    ],
)
def test_upload_metrics_are_bounded_and_finite(harness, metrics, problem):
    h = harness({"w": torch.zeros(4)}, silos=("s1",))
    h.join("s1")
    h.open_round()
    code, details = status_of(
        lambda: _upload(h, {"w": torch.ones(4)}, num_samples=10, metrics=metrics)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and problem in details
    ok = _upload(h, {"w": torch.ones(4)}, num_samples=10, metrics={"train_loss": 0.5})
    assert ok.accepted
    h.thread.join(10)
    assert read_jsonl(h.store.metrics_path)[0]["silos"][0]["train_loss"] == 0.5


def _service_lines(caplog, wanted, timeout=30.0):
    """The service's log lines, once one says ``wanted`` (the server notices a client's
    cancel on its own time: seconds on a loaded machine) or ``timeout`` has passed."""
    end = time.monotonic() + timeout
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "lssfl.service"]
        if any(wanted in m for m in lines) or time.monotonic() > end:
            return lines
        time.sleep(0.05)


def test_a_cancelled_upload_is_logged_as_a_cancel_not_an_internal_error(harness, caplog):
    caplog.set_level(logging.INFO, "lssfl")
    h = harness({"w": torch.zeros(4)}, silos=("s1",))
    h.join("s1")
    h.open_round()
    finished = threading.Event()

    def stalled():
        yield pb.ModelChunk(upload=pb.UploadHeader(run_id="run1", round=1, silo_id="s1"))
        finished.wait(30)

    # The client gives up (its deadline) with the server waiting for the rest of the stream.
    with pytest.raises(grpc.RpcError) as info:
        h.stub.UploadResult(stalled(), timeout=1.0)
    finished.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    lines = _service_lines(caplog, "ended by the client")
    assert any("ended by the client: cancelled" in m for m in lines), lines
    # A message over the size limit (from a client without our send limit): the same.
    caplog.clear()
    raw = grpc.insecure_channel(f"127.0.0.1:{h.port}")
    header = pb.ModelChunk(upload=pb.UploadHeader(run_id="run1", round=1, silo_id="s1"))
    oversize = [header, pb.ModelChunk(data=b"x" * (MAX_MESSAGE_BYTES + 1))]
    with pytest.raises(grpc.RpcError) as info:
        coordinator_stub(raw).UploadResult(iter(oversize), timeout=30)
    raw.close()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    lines += _service_lines(caplog, "ended by the client")
    assert any("a message over 4 MiB" in m for m in lines), lines
    assert not any("internal error" in m for m in lines)


def test_failure_report_stops_the_wait_for_that_silo(harness, caplog):
    caplog.set_level(logging.WARNING, "lssfl.coordinator")
    h = harness({"w": torch.zeros(4)})  # deadline 30 s
    h.join("s1", "s2")
    h.open_round()
    reason = "data does not fit\nthe model " + "z" * 10_000
    report = cpb.FailureReport(silo_id="s2", run_id="run1", round=1, reason=reason)
    assert h.stub.ReportFailure(report, timeout=5).current_round == 1
    # No more TRAIN for s2 this round (GetTask would long-poll).
    assert h.coordinator.pending_task("s2") is None
    assert h.coordinator.pending_task("s1").kind == cpb.Task.TRAIN
    assert _upload(h, {"w": torch.ones(4)}, num_samples=10).accepted
    h.thread.join(10)
    assert not h.thread.is_alive()  # closed long before the 30 s deadline
    record = read_jsonl(h.store.metrics_path)[0]
    assert record["num_results"] == 1 and record["missing"] == ["s2"]
    # Metered like every call: s2's only traffic in round 1 is this report and its reply.
    s2 = {s["silo_id"]: s for s in record["silos"]}["s2"]
    assert (s2["bytes_up"], s2["bytes_down"]) == (report.ByteSize(), 2)
    # Recorded as what it was, with the reason (one line, bounded), not as a silo gone missing.
    assert s2["status"] == "failed" and s2["failure"].startswith("data does not fit the model zz")
    assert len(s2["failure"]) < 500
    assert {s["silo_id"]: s for s in record["silos"]}["s1"]["failure"] is None
    lines = [r.getMessage() for r in caplog.records]
    reported = [m for m in lines if m.startswith("round=1 silo=s2 reported a failure")]
    assert len(reported) == 1 and "\n" not in reported[0] and len(reported[0]) < 500
    assert any(
        "closing early: s2 reported a failure (data does not fit the model" in m for m in lines
    )


def test_round_closes_early_when_every_outstanding_silo_is_silent(harness, caplog):
    caplog.set_level(logging.WARNING, "lssfl.coordinator")
    # Silent after 3 x 0.1 + 2 s.
    h = harness({"w": torch.zeros(4)}, heartbeat_interval_s=0.1, deadline=60.0)
    h.join("s1", "s2")
    h.open_round()
    assert _upload(h, {"w": torch.ones(4)}, num_samples=10).accepted
    h.thread.join(20)  # s2 never calls again
    assert not h.thread.is_alive()
    record = read_jsonl(h.store.metrics_path)[0]
    assert record["missing"] == ["s2"] and record["wall_seconds"] < 30
    assert any("closing early: s2 no heartbeat for" in r.getMessage() for r in caplog.records)


def test_no_round_opens_without_min_silos_live(harness, caplog):
    caplog.set_level(logging.INFO, "lssfl.coordinator")
    # 3 rounds; a silo is gone after 3 x 0.1 + 2 s without a call.
    h = harness({"w": torch.zeros(4)}, heartbeat_interval_s=0.1, max_wait_s=1.0)
    h.join("s1", "s2")
    # Both then go silent (SIGKILLed, network cut). Round 1 was opened for them and closes
    # early; round 2 is not opened for nobody: the coordinator waits, then gives up.
    with pytest.raises(RuntimeError, match=r"gave up before round 2: only 0 of 2 silos live"):
        h.coordinator.run()
    assert [(r.round, r.status) for r in h.store.records()] == [(0, "initial"), (1, "insufficient")]
    lines = [r.getMessage() for r in caplog.records]
    assert "round=2 waiting for silos: 0 live (none), min_silos=1" in lines
    assert not any("round=2 opened" in m for m in lines)


def test_stop_while_waiting_for_joins_is_a_stop_not_a_join_timeout(harness):
    h = harness({"w": torch.zeros(4)}, join_timeout_s=60.0)
    outcome = []

    def run():
        try:
            h.coordinator.run()
        except BaseException as exc:  # what run raises is the point of the test
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    h.coordinator.stop()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)


def test_join_refuses_data_that_does_not_fit_the_model(harness):
    h = harness({"w": torch.zeros(4)})
    h.coordinator.data_spec = ((3, 16, 16), 10)
    for shape, classes, problem in [
        ([1, 28, 28], 10, "data samples have shape [1, 28, 28], the model takes [3, 16, 16]"),
        ([3, 16, 16], 12, "data has 12 classes, the model predicts 10"),
    ]:
        request = cpb.JoinRequest(
            silo_id="s1", num_samples=5, sample_shape=shape, num_classes=classes
        )
        code, details = status_of(lambda r=request: h.stub.Join(r, timeout=5))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, problem)
    ok = cpb.JoinRequest(silo_id="s1", num_samples=5, sample_shape=[3, 16, 16], num_classes=10)
    assert h.stub.Join(ok, timeout=5).run_id == "run1"
