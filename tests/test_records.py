"""The round record (lssfl.common.records): the metrics.jsonl layout, and reading it back."""

import json

from lssfl.common.records import RoundRecord, SiloEvaluation, SiloRound


def _record() -> RoundRecord:
    silo = SiloRound("silo-1", "ok", 120, 10, 20, 30, 40, 5, 6, 1.25, {"train_loss": 0.5})
    idle = SiloRound("silo-2", "missing", 80, 10, 0, 30, 0, 5, 0, None)
    return RoundRecord(
        round=3, algorithm="lss", status="ok", global_accuracy=0.5, global_loss=1.5,
        bytes_down=20, bytes_down_raw=60, bytes_down_payload=10, bytes_up=20, bytes_up_raw=40,
        bytes_up_payload=6, cum_bytes_down=100, cum_bytes_up=90, codec_down="int8",
        codec_up="fp32", delta_downlink=True, wall_seconds=2.5, num_results=1,
        missing=["silo-2"], late_refused=0, silos=[silo, idle],
    )  # fmt: skip


def test_the_jsonl_object_has_the_documented_keys_in_order() -> None:
    d = _record().to_dict()
    assert list(d) == [
        "round", "algorithm", "status", "global_accuracy", "global_loss", "bytes_down",
        "bytes_down_raw", "bytes_down_payload", "bytes_up", "bytes_up_raw", "bytes_up_payload",
        "cum_bytes_down", "cum_bytes_up", "codec_down", "codec_up", "delta_downlink",
        "wall_seconds", "num_results", "missing", "late_refused", "silos", "evaluation",
        "silo_accuracy", "silo_loss", "evaluations",
    ]  # fmt: skip
    assert d["silos"][0] == {
        "silo_id": "silo-1", "status": "ok", "num_samples": 120, "bytes_down": 10,
        "bytes_up": 20, "bytes_down_raw": 30, "bytes_up_raw": 40, "bytes_down_payload": 5,
        "bytes_up_payload": 6, "train_seconds": 1.25, "failure": None, "train_loss": 0.5,
    }  # fmt: skip
    assert "train_loss" not in d["silos"][1] and d["silos"][1]["train_seconds"] is None


def test_a_record_reads_back_equal_through_json() -> None:
    record = _record()
    again = RoundRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert json.dumps(again.to_dict()) == json.dumps(record.to_dict())


def test_a_record_from_before_silo_evaluation_reads_with_defaults() -> None:
    old = _record().to_dict()
    for key in ("evaluation", "silo_accuracy", "silo_loss", "evaluations"):
        old.pop(key)
    for silo in old["silos"]:
        silo.pop("failure")  # from before silo failures were recorded as such
    again = RoundRecord.from_dict(old)
    assert again == _record() and again.evaluation == "coordinator" and again.evaluations == []


def test_silo_evaluations_set_the_weighted_mean() -> None:
    record = _record()
    record.evaluation = "silos"
    record.add_evaluations([SiloEvaluation("b", 0.5, 1.0, 30), SiloEvaluation("a", 1.0, 0.2, 10)])
    assert [e.silo_id for e in record.evaluations] == ["a", "b"]
    assert record.global_accuracy == record.silo_accuracy == (1.0 * 10 + 0.5 * 30) / 40
    assert record.global_loss == record.silo_loss == (0.2 * 10 + 1.0 * 30) / 40
    both = _record()
    both.evaluation = "both"
    both.add_evaluations([SiloEvaluation("a", 1.0, 0.2, 10)])
    assert both.global_accuracy == 0.5 and both.silo_accuracy == 1.0  # the coordinator's stays
