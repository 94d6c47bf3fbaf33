"""Evaluation at the silos: the coordinator's side over a real loopback gRPC service, and a
whole `lssfl run` on folders with no test split at the centre."""

import math
import threading

import grpc
import pytest
import torch

from lssfl.common.config import ConfigError, load_config
from lssfl.common.records import RoundRecord
from lssfl.common.security import CA_CERT, channel_credentials, make_certs, silo_files
from lssfl.common.wire import encode_model
from lssfl.dataprep.dataroot import prepare_data_root, with_evaluation_resolved
from lssfl.dataprep.silodata import SiloData
from lssfl.dataprep.splits import load_split, save_split
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from lssfl.silo.daemon import SiloDaemon
from tests.conftest import Harness, read_jsonl, run_lssfl, status_of, wait_for


def _upload(h, state, silo, evaluation):
    header = pb.ModelChunk(
        upload=pb.UploadHeader(
            run_id="run1", round=1, silo_id=silo, num_samples=8, evaluation=evaluation
        )
    )
    return h.stub.UploadResult(iter(encode_model(state, header)), timeout=30)


def _report(h, silo, accuracy, loss=0.5, n=5, round_num=1):
    ev = pb.Evaluation(accuracy=accuracy, loss=loss, num_samples=n)
    request = cpb.EvaluationReport(silo_id=silo, run_id="run1", round=round_num, evaluation=ev)
    return h.stub.ReportEvaluation(request, timeout=10)


def _task(h, silo):
    return h.stub.GetTask(cpb.TaskRequest(silo_id=silo, run_id="run1"), timeout=10)


def test_silo_figures_go_to_the_round_whose_model_they_measured_bounded_and_metered(tmp_path):
    state = {"w": torch.randn(4, 3)}
    h = Harness(tmp_path, state, evaluation={"where": "silos", "holdout": 0.25}, rounds=1)
    thread = threading.Thread(target=h.coordinator.run)
    try:
        h.join("s1", "s2")  # each declares 10 samples
        thread.start()
        task = _task(h, "s1")
        assert task.kind == cpb.Task.TRAIN and task.round == 1
        assert task.evaluation_json == '{"holdout": 0.25, "seed": 0}'
        # Round 0 (the initial model) is committed before any silo has measured it.
        assert read_jsonl(tmp_path / "metrics.jsonl")[0]["global_accuracy"] is None

        # An upload's evaluation is bounded like everything else a silo sends.
        for bad, why in [
            (pb.Evaluation(accuracy=1.5, loss=0.1, num_samples=4), "accuracy must be in [0, 1]"),
            (pb.Evaluation(accuracy=math.nan, loss=0.1, num_samples=4), "accuracy"),
            (pb.Evaluation(accuracy=0.5, loss=math.inf, num_samples=4), "loss must be a finite"),
            (pb.Evaluation(accuracy=0.5, loss=0.1, num_samples=11), "num_samples must be in"),
        ]:
            code, details = status_of(lambda bad=bad: _upload(h, state, "s1", bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and why in details, details
        # The model received in round 1 is round 0's: that is where the figures go.
        _upload(h, state, "s1", pb.Evaluation(accuracy=0.5, loss=2.0, num_samples=2))
        _upload(h, state, "s2", pb.Evaluation(accuracy=0.75, loss=1.0, num_samples=6))

        wait_for(lambda: _task(h, "s2").kind == cpb.Task.EVALUATE, 20, "the EVALUATE task")
        r0 = RoundRecord.from_dict(read_jsonl(tmp_path / "metrics.jsonl")[0])
        assert r0.global_accuracy == pytest.approx((0.5 * 2 + 0.75 * 6) / 8)
        assert r0.global_loss == pytest.approx((2.0 * 2 + 1.0 * 6) / 8)
        assert [(e.silo_id, e.num_samples) for e in r0.evaluations] == [("s1", 2), ("s2", 6)]

        # The final model: downloaded whole, then measured through ReportEvaluation, which
        # is authenticated, bounded and metered like every other call.
        assert h.download("s1").state["w"].equal(h.coordinator.global_state["w"])
        code, _ = status_of(lambda: _report(h, "mallory", 0.5))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, details = status_of(lambda: _report(h, "s1", -0.1))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "[0, 1]" in details
        code, details = status_of(lambda: _report(h, "s1", 0.5, round_num=7))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "round 7" in details
        before = h.coordinator.meter.get(1, "s1", "up").messages
        assert _report(h, "s1", 1.0, n=3).accepted
        assert h.coordinator.meter.get(1, "s1", "up").messages == before + 1
        assert _report(h, "s2", 0.0, n=1).accepted
        wait_for(lambda: _task(h, "s1").kind == cpb.Task.DONE, 20, "the run to end")
        assert _task(h, "s2").kind == cpb.Task.DONE
        thread.join(20)
        assert not thread.is_alive()
    finally:
        h.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1]
    r1 = records[1]
    assert r1["evaluation"] == "silos" and r1["global_accuracy"] == pytest.approx(3 / 4)
    assert {e["silo_id"]: e["accuracy"] for e in r1["evaluations"]} == {"s1": 1.0, "s2": 0.0}


def test_where_defaults_to_silos_without_a_test_split_and_coordinator_with_one(tmp_path):
    base = {"silos": ["a"], "model": {"init": "random"}}
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**base, "data": {"kind": "folders", "root": str(tmp_path)}}))
    assert with_evaluation_resolved(load_config(path)).evaluation.where == "silos"
    (tmp_path / "test").mkdir()
    assert with_evaluation_resolved(load_config(path)).evaluation.where == "coordinator"
    (tmp_path / "test").rmdir()
    path.write_text(
        yaml.safe_dump(
            {
                **base,
                "data": {"kind": "folders", "root": str(tmp_path)},
                "evaluation": {"where": "both"},
            }  # fmt: skip
        )
    )
    with pytest.raises(ConfigError, match="evaluation.where 'both' needs the coordinator's test"):
        with_evaluation_resolved(load_config(path))
    for bad, message in [
        ({"where": "centre"}, "evaluation.where must be one of coordinator, silos, both"),
        ({"holdout": 1.0}, r"evaluation.holdout must be in \(0, 1\)"),
    ]:
        path.write_text(yaml.safe_dump({**base, "evaluation": bad}))
        with pytest.raises(ConfigError, match=message):
            load_config(path)


@pytest.mark.slow
def test_lssfl_run_on_folders_without_a_test_split_is_evaluated_at_the_silos(
    tmp_path, write_config
):
    emb = prepare_data_root(load_config(write_config("gen.yaml")))
    root = tmp_path / "folders"
    for silo, src in list(emb.silo_dirs.items())[:2]:
        split = load_split(src)
        x = split.x[:100]  # small: training is not the point
        # silo-1's images are uint8 on disk, read per batch, and its held-out part is drawn
        # from them without reading them.
        save_split(
            root / silo, (x * 255).round().to(torch.uint8) if silo == "silo-1" else x, split.y[:100]
        )
    # silo-2 has its own test split: it evaluates on that and trains on all its data.
    test = load_split(emb.test_dir)
    save_split(root / "silo-2" / "test", test.x[:50], test.y[:50])
    config = write_config(
        run={"rounds": 1},  # round 0 measured at round 1's download, round 1 by EVALUATE
        silos=["silo-1", "silo-2"],
        data={"kind": "folders", "root": str(root)},
        model={"init": "random"},
        coordinator={"min_silos": 2},
    )
    run_dir = tmp_path / "run"
    proc = run_lssfl("run", "--config", str(config), "--run-dir", str(run_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1]
    n1 = load_split(root / "silo-1").num_samples
    for rec in records:
        assert rec["evaluation"] == "silos"
        by_silo = {e["silo_id"]: e for e in rec["evaluations"]}
        assert by_silo["silo-1"]["num_samples"] == round(0.2 * n1)
        assert by_silo["silo-2"]["num_samples"] == 50
        weighted = sum(e["accuracy"] * e["num_samples"] for e in by_silo.values()) / sum(
            e["num_samples"] for e in by_silo.values()
        )
        assert rec["global_accuracy"] == pytest.approx(weighted, abs=1e-12)
        assert 0.0 <= rec["global_accuracy"] <= 1.0
    # silo-1 trains on what it did not hold out; silo-2 on all of its data.
    trained = {s["silo_id"]: s["num_samples"] for s in records[1]["silos"]}
    assert trained == {
        "silo-1": n1 - round(0.2 * n1),
        "silo-2": load_split(root / "silo-2").num_samples,
    }
    # Round 0's row is printed when it commits, its accuracy pending ("-"); the console says
    # the figures when the silos' measures arrive with round 1.
    r0 = records[0]
    held_out = sum(e["num_samples"] for e in r0["evaluations"])
    late = (
        f"round 0: silos measured accuracy={r0['silo_accuracy']:.4f} "
        f"loss={r0['silo_loss']:.4f} on {held_out} held-out samples\n"
    )
    row0 = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["0"])
    assert row0.split()[1] == "-" and proc.stdout.index(row0) < proc.stdout.index(late)
    report = (run_dir / "report.html").read_text()
    assert "Evaluation at the silos" in report
    silo_log = (run_dir / "logs" / "silo-2.log").read_text()
    assert "evaluates on 50 held-out samples (its own test split)" in silo_log
    silo_log = (run_dir / "logs" / "silo-1.log").read_text()
    assert "(100 samples, uint8 on disk, read per batch, on cpu)" in silo_log


def test_report_evaluation_is_authenticated_like_every_call(tmp_path):
    folder = tmp_path / "certs"
    make_certs(folder, ["silo-1", "silo-2"], ["localhost", "127.0.0.1"])
    h = Harness(
        tmp_path / "run",
        {"w": torch.zeros(2)},
        silos=("silo-1", "silo-2"),
        security={"dir": str(folder), "tls": True, "tokens": True},
        credentials=channel_credentials(folder / CA_CERT, None, None),
        evaluation={"where": "silos"},
    )
    request = cpb.EvaluationReport(
        silo_id="silo-1", run_id="run1", round=1, evaluation=pb.Evaluation(num_samples=1)
    )

    def report(token_of):
        token = silo_files(folder, token_of)[2].read_text().strip() if token_of else ""
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return h.stub.ReportEvaluation(request, timeout=10, metadata=metadata)

    try:
        code, details = status_of(lambda: report(None))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in details
        code, details = status_of(lambda: report("silo-2"))  # another silo's token
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid for silo 'silo-1'" in details
        # Its own token gets it past the gate, to the coordinator's own checks.
        code, details = status_of(lambda: report("silo-1"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "must join first" in details
    finally:
        h.close()


def test_a_silo_holds_out_the_same_samples_every_time_and_checks_what_it_is_told(tmp_path):
    x = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1)
    data = SiloData(x, torch.arange(40) % 10, 10, "float32 tensors in memory")

    def held_out(silo_id, text='{"holdout": 0.25, "seed": 7}'):
        daemon = SiloDaemon("127.0.0.1:1", silo_id, data, torch.device("cpu"))
        train_x, train_y, test_x, test_y = daemon.split_for(text)
        daemon.close()
        train, test = set(train_x.flatten().tolist()), set(test_x.flatten().tolist())
        assert len(test) == 10 and len(train) == 30 and not train & test
        assert train_y.tolist() == [int(v) % 10 for v in train_x.flatten().tolist()]
        return test

    assert held_out("silo-1") == held_out("silo-1")  # restarts hold out the same samples
    assert held_out("silo-1") != held_out("silo-2")  # drawn from (run seed, silo id)
    for text in ('{"holdout": 1.5, "seed": 7}', '{"seed": 7}', "[]", "x" * 10_000):
        with pytest.raises(ValueError, match="task evaluation_json .* is (not valid|out of range)"):
            held_out("silo-1", text)


def test_a_silo_daemon_on_an_image_folder_trains_and_evaluates_through_the_service(tmp_path):
    # A real SiloDaemon against the real service in this process: its data is an image folder
    # read per batch, holding 2 of the 10 declared classes.
    from lssfl.common.models import build_model
    from lssfl.dataprep.silodata import ImageTransform, open_silo_data
    from tests.test_silodata import _images

    folder = _images(tmp_path / "images", {"c3": 12, "c7": 8}, size=16)
    (folder / "classes.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    data = open_silo_data(folder, transform=ImageTransform(None, None, None), workers=2)
    assert sorted(set(data.y.tolist())) == [3, 7]
    state = build_model({"name": "mlp"}).state_dict()
    h = Harness(tmp_path / "run", state, silos=("s1",), evaluation={"where": "silos"}, rounds=1)
    daemon = SiloDaemon(f"127.0.0.1:{h.port}", "s1", data, torch.device("cpu"))
    coordinator = threading.Thread(target=h.coordinator.run)
    silo = threading.Thread(target=daemon.run)
    try:
        coordinator.start()
        silo.start()
        coordinator.join(60)
        silo.join(30)
        assert not coordinator.is_alive() and not silo.is_alive()
    finally:
        h.close()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1]
    for rec in records:
        (evaluation,) = rec["evaluations"]
        assert evaluation["silo_id"] == "s1" and evaluation["num_samples"] == 4  # 0.2 of 20
        assert rec["global_accuracy"] == evaluation["accuracy"]
    assert records[1]["silos"][0]["num_samples"] == 16  # trained on the other 16


def test_tensorboard_gets_a_rounds_accuracy_when_the_silos_have_measured_it(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lssfl.common.records import SiloEvaluation, SiloRound
    from lssfl.server.tensorboard import TensorBoardLog

    silo = SiloRound("s1", "ok", 10, 100, 50, 100, 50, 100, 50, 1.0, {"train_loss": 0.5})
    record = RoundRecord(
        round=1, algorithm="fedavg", status="ok", global_accuracy=None, global_loss=None,
        bytes_down=100, bytes_down_raw=100, bytes_down_payload=100, bytes_up=50,
        bytes_up_raw=50, bytes_up_payload=50, cum_bytes_down=100, cum_bytes_up=50,
        codec_down="fp32", codec_up="fp32", delta_downlink=False, wall_seconds=1.0,
        num_results=1, missing=[], late_refused=0, silos=[silo], evaluation="silos",
    )  # fmt: skip
    board = TensorBoardLog(tmp_path)
    board.add(record)  # committed: accuracy pending
    record.add_evaluations([SiloEvaluation("s1", 0.75, 0.5, 4)])
    board.add(record)  # measured a round later
    board.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("global/accuracy")] == [(1, 0.75)]
    assert [e.value for e in events.Scalars("silo/s1/eval_accuracy")] == [0.75]
    assert len(events.Scalars("bytes/down")) == 1  # written once, not again with the measure


def test_an_evaluate_task_imports_no_model_path_the_silo_did_not_allow(tmp_path):
    from lssfl.common.plugins import PluginNotAllowed

    data = SiloData(torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long), 10, "test")
    daemon = SiloDaemon("127.0.0.1:9", "s1", data, torch.device("cpu"))
    task = cpb.Task(
        kind=cpb.Task.EVALUATE,
        round=3,
        model_json='{"name": "never_imported_module:build"}',
        evaluation_json='{"holdout": 0.25, "seed": 0}',
    )
    try:
        # Refused before a byte is downloaded (the address is a closed port: a download
        # would fail differently).
        with pytest.raises(PluginNotAllowed, match="asks for model 'never_imported_module:"):
            daemon.evaluate_final(task)
    finally:
        daemon.close()
