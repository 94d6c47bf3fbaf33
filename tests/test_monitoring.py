"""The coordinator's Prometheus endpoint, scraped over HTTP on 127.0.0.1 while a real
in-process gRPC service runs rounds."""

import json
import sys
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lssfl.common.config import ConfigError, parse_config
from lssfl.common.records import RoundRecord
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.server.prometheus import serve_metrics
from tests.conftest import Harness, read_jsonl


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_shows_rounds_silos_bytes_and_refusals(tmp_path):
    state = {"w": torch.randn(64, 32), "n": torch.tensor(3)}
    h = Harness(tmp_path, state)
    server, port = serve_metrics(h.coordinator, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"cannot serve Prometheus metrics on 127.0.0.1:{port}"):
            serve_metrics(h.coordinator, "127.0.0.1", port)  # taken by the first
        h.join("s1", "s2")
        with pytest.raises(grpc.RpcError):
            h.stub.Join(cpb.JoinRequest(silo_id="mallory"), timeout=5)
        before = _scrape(port)
        assert before[("lssfl_silos_live", ())] == 2
        assert before[("lssfl_silos_enrolled", ())] == 2
        assert before[("lssfl_rounds_completed_total", ())] == 0
        assert before[("lssfl_refusals_total", (("code", "PERMISSION_DENIED"),))] == 1

        h.open_round()
        for silo in ("s1", "s2"):
            got = h.download(silo)
            assert h.upload(got.state, silo=silo).accepted
        h.thread.join(30)
        after = _scrape(port)
        (record,) = read_jsonl(tmp_path / "metrics.jsonl")
        assert after[("lssfl_round", ())] == 1
        assert after[("lssfl_rounds_completed_total", ())] == 1
        assert after[("lssfl_global_accuracy", ())] == record["global_accuracy"]
        model_bytes = sum(v.nbytes for v in state.values())
        for direction in ("down", "up"):
            sent = after[("lssfl_bytes_total", (("direction", direction),))]
            # The round's record, plus what the joins and polls of round 0 cost.
            round0 = sum(h.coordinator.meter.get(0, s, direction).bytes for s in ("s1", "s2"))
            assert sent == record[f"bytes_{direction}"] + round0
            assert 2 * model_bytes < sent < 2 * model_bytes + 10_000
    finally:
        server.shutdown()
        h.close()


def test_monitoring_options_are_checked(monkeypatch):
    base = {"silos": ["a"], "model": {"init": "random"}}
    cfg = parse_config(
        base | {"coordinator": {"prometheus_port": 9464}, "run": {"tensorboard": True}}
    )
    assert cfg.coordinator.prometheus_port == 9464 and cfg.run.tensorboard
    assert parse_config(base).coordinator.prometheus_port is None  # off by default
    with pytest.raises(ConfigError, match="coordinator.prometheus_port must be 0..65535"):
        parse_config(base | {"coordinator": {"prometheus_port": 70000}})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"run.tensorboard needs the tensorboard package: "
                       r"pip install 'lssfl\[tensorboard\]'"):  # fmt: skip
        parse_config(base | {"run": {"tensorboard": True}})


def test_round_progress_redraws_one_line_on_a_terminal_and_keeps_lines_in_a_pipe(tmp_path, capsys):
    from lssfl.launcher import _RoundProgress
    from lssfl.server.store import RoundStore
    from tests.test_report import _record

    store = RoundStore(tmp_path)
    try:
        store.set_phase(1, "train")
        store.put(selected=json.dumps(["silo-1", "silo-2", "silo-3"]), reported="[]")
        # silo-3 never answers: the record says it was missing
        record = RoundRecord.from_dict(_record("fedavg", 1, 0.5, 10, 10, missing=("silo-3",)))
        for tty in (True, False):
            progress = _RoundProgress(tmp_path)
            progress.tty = tty
            progress.update()
            store.put(reported=json.dumps(["silo-2"]))
            progress.update()
            progress.update()  # nothing new: nothing drawn
            progress.finish(record)
            print("ROW")
            store.put(reported="[]")
            out = capsys.readouterr().out
            if tty:
                assert out == (
                    "\r" "round 1: 0/3 silos reported\x1b[K"
                    "\r" "round 1: 1/3 silos reported (silo-2)\x1b[K"
                    "\r\x1b[K" "ROW\n"
                )  # fmt: skip
            else:
                assert out == (
                    "round 1: 0/3 silos reported\n"
                    "round 1: 1/3 silos reported (silo-2)\n"
                    "round 1: 2/3 silos reported (silo-1, silo-2)\n"  # from the record
                    "ROW\n"
                )
    finally:
        store.close()
