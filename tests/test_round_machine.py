"""The coordinator's round state machine driven directly: no port, no gRPC.

Silos are played by calling the Coordinator's methods with the protobuf requests, and
uploads are in-memory streams built by lssfl.common.wire, metered as the service meters them.
"""

import itertools
import threading

import pytest
import torch

from lssfl.common.config import ConfigError, parse_config
from lssfl.common.wire import encode_model, parse_chunk, to_wire
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.admission import RefusalKind, Refused
from lssfl.server.coordinator import Coordinator
from lssfl.server.phases import Phase
from lssfl.server.store import RoundStore
from tests.conftest import wait_for

RUN = "run1"
STATE = {"w": torch.zeros(4, 3), "n": torch.tensor(0)}


def _config(**coordinator):
    return parse_config(
        {
            "silos": ["s1", "s2"],
            "coordinator": {"min_silos": 1, "round_deadline_s": 60, **coordinator},
            "model": {"name": "mlp", "init": "random"},
            "data": {"kind": "folders"},
            "run": {"rounds": 2},
        }
    )


class Machine:
    """One coordinator over a store folder, its driver on a thread."""

    def __init__(self, folder, evaluate=lambda state: (0.5, 1.0)) -> None:
        self.store = RoundStore(folder)
        if self.store.get("identity") is None:  # what `lssfl run` writes first
            self.store.put(run_id=RUN, identity="{}")
        self.coordinator = Coordinator(_config(), self.store, STATE, evaluate, run_id=RUN)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ended: BaseException | None = None

    def _run(self) -> None:
        try:
            self.coordinator.run()
        except BaseException as exc:  # KeyboardInterrupt after stop(): the crash
            self.ended = exc

    def start(self, *silos: str) -> None:
        for silo in silos:
            self.coordinator.join(cpb.JoinRequest(silo_id=silo, num_samples=10, version="t"))
        self.thread.start()

    def task(self, silo: str) -> cpb.Task:
        return self.coordinator.get_task(cpb.TaskRequest(silo_id=silo, run_id=RUN), wait_s=10)

    def upload(self, silo: str, round_num: int, value: float, num_samples: int = 10):
        """Admit and take ``silo``'s model of all ``value``, metered as the service does."""
        header = pb.ModelChunk(
            upload=pb.UploadHeader(
                run_id=RUN, round=round_num, silo_id=silo, num_samples=num_samples
            )
        )
        state = {"w": torch.full((4, 3), value), "n": torch.tensor(2)}
        messages = [parse_chunk(to_wire(m)) for m in encode_model(state, header)]
        done = self.coordinator.admit_upload(header)
        if done is not None:
            return done
        meter = self.coordinator.meter
        stream = meter.received(round_num, silo, itertools.chain([header], messages[1:]))
        next(stream)
        return self.coordinator.upload(header, stream)

    def crash(self) -> None:
        """Abandon this coordinator mid-round (its driver thread stops, nothing committed)."""
        self.coordinator.stop()
        self.thread.join(10)
        self.store.close()


def test_join_train_late_upload_crash_and_resume(tmp_path):
    late: list[Refused] = []

    def evaluate(state):
        # Runs with the round closed, before its record: s2's result now is late.
        if machine.coordinator.phase is Phase.AGGREGATE and not late:
            with pytest.raises(Refused) as refused:
                machine.upload("s2", 1, 9.0)
            late.append(refused.value)
        return 0.5, 1.0

    machine = Machine(tmp_path, evaluate)
    assert machine.coordinator.phase is Phase.WAITING
    machine.start("s1", "s2")

    # Round 1: both silos train; s1 uploads, s2 fails, the round closes without waiting.
    task = machine.task("s1")
    assert (task.kind, task.round) == (cpb.Task.TRAIN, 1)
    assert machine.coordinator.phase is Phase.TRAIN
    assert machine.coordinator.selected() == ["s1", "s2"]
    assert machine.upload("s1", 1, 2.0).message == "ok"
    assert machine.upload("s1", 1, 2.0).message == "duplicate upload ignored"
    assert machine.coordinator.accepted() == ["s1"]
    assert machine.coordinator.pending_task("s1") is None  # trained already
    machine.coordinator.report_failure(
        cpb.FailureReport(silo_id="s2", run_id=RUN, round=1, reason="out of memory")
    )
    wait_for(lambda: len(machine.store.records()) == 2, 30, "round 1's record")
    assert late[0].refusal.kind is RefusalKind.PRECONDITION and late[0].refusal.late
    assert str(late[0]) == "round 1 is closed (current round 1, aggregate)"

    initial, first = machine.store.records()
    assert (initial.round, initial.status, initial.global_accuracy) == (0, "initial", 0.5)
    assert (first.round, first.status, first.num_results) == (1, "ok", 1)
    assert (first.missing, first.late_refused) == (["s2"], 1)
    silos = {s.silo_id: s for s in first.silos}
    assert (silos["s1"].status, silos["s2"].status) == ("ok", "failed")
    assert silos["s2"].failure == "out of memory"
    assert silos["s1"].bytes_up > 0 and silos["s1"].bytes_up_raw == 4 * 3 * 4 + 8

    # Round 2: s1's upload is accepted, then the coordinator crashes before the round closes.
    wait_for(lambda: machine.coordinator.phase is Phase.TRAIN, 30, "round 2")
    assert machine.task("s1").round == 2
    assert machine.upload("s1", 2, 4.0).message == "ok"
    uploaded = machine.coordinator.meter.get(2, "s1", "up")
    assert machine.store.get("phase") == "train"
    machine.crash()
    assert isinstance(machine.ended, KeyboardInterrupt)

    # The same store folder, a new coordinator: round 2 again, s1's upload kept.
    machine = Machine(tmp_path)
    assert len(machine.store.records()) == 2  # round 2 was not committed
    assert machine.coordinator.phase is Phase.WAITING
    machine.start("s1", "s2")
    wait_for(lambda: machine.coordinator.phase is Phase.TRAIN, 30, "round 2 reopened")
    assert machine.coordinator.accepted() == ["s1"]
    assert machine.coordinator.pending_task("s1") is None  # not asked to train again
    assert machine.task("s2").kind == cpb.Task.TRAIN
    # Not selected for a round that is not open: refused, counted nowhere.
    with pytest.raises(Refused, match="round 3 is not open"):
        machine.upload("s2", 3, 1.0)
    assert machine.upload("s2", 2, 6.0).message == "ok"
    for silo in ("s1", "s2"):
        assert machine.task(silo).kind == cpb.Task.DONE
    machine.thread.join(30)
    assert machine.ended is None and machine.coordinator.phase is Phase.DONE
    assert machine.store.get("phase") == "done"

    second = machine.store.records()[2]
    assert (second.round, second.status, second.num_results, second.late_refused) == (
        2,
        "ok",
        2,
        0,
    )
    kept = {s.silo_id: s for s in second.silos}["s1"]
    # The kept upload counts with the bytes it was sent with, before the crash.
    assert (kept.bytes_up, kept.bytes_up_raw) == (uploaded.bytes, uploaded.raw)
    assert second.cum_bytes_up == first.cum_bytes_up + second.bytes_up
    # Equal weights: the average of 4 and 6.
    final = machine.coordinator.global_state
    assert torch.equal(final["w"], torch.full((4, 3), 5.0))
    machine.store.close()


def test_refusals_carry_their_kind_without_grpc(tmp_path):
    machine = Machine(tmp_path)
    coordinator = machine.coordinator
    with pytest.raises(Refused) as unknown:
        coordinator.join(cpb.JoinRequest(silo_id="intruder", num_samples=10))
    assert unknown.value.refusal.kind is RefusalKind.PERMISSION
    with pytest.raises(Refused) as not_joined:
        coordinator.heartbeat(cpb.HeartbeatRequest(silo_id="s1", run_id=RUN))
    assert not_joined.value.refusal.kind is RefusalKind.PRECONDITION
    with pytest.raises(Refused) as too_many:
        coordinator.join(cpb.JoinRequest(silo_id="s1", num_samples=0))
    assert too_many.value.refusal.kind is RefusalKind.INVALID
    coordinator.join(cpb.JoinRequest(silo_id="s1", num_samples=10))
    with pytest.raises(Refused, match="is not the current run"):
        coordinator.heartbeat(cpb.HeartbeatRequest(silo_id="s1", run_id="other"))
    with pytest.raises(Refused, match="not open for download"):
        coordinator.download(cpb.DownloadRequest(silo_id="s1", run_id=RUN, round=1))
    assert coordinator.late_refused(0) == 0
    machine.store.close()


def test_an_unknown_aggregation_rule_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as exc:
        _config(aggregation="median")
    message = str(exc.value)
    assert message.endswith("coordinator.aggregation 'median' is not one of weighted_mean")
    assert "\n" not in message


def test_the_config_and_the_server_know_the_same_aggregation_rules():
    from lssfl.common.config import AGGREGATION_RULES
    from lssfl.server.aggregate import RULES

    assert tuple(RULES) == AGGREGATION_RULES
