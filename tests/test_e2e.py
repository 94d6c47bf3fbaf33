"""End to end with real OS processes: coordinator and silos over loopback gRPC."""

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from lssfl.dataprep.splits import load_split, save_split
from tests.conftest import free_port, lssfl_cmd, read_jsonl, run_lssfl, wait_for

# Real OS processes, gRPC over sockets: minutes on 2 cores (`pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


def test_lssfl_run_three_silos_aggregate_matches_independent_average(tmp_path, write_config):
    port = free_port()
    config = write_config(coordinator={"save_uploads": True, "port": port})
    run_dir = tmp_path / "runs" / "e2e"
    proc = run_lssfl("run", "--config", str(config), "--run-dir", str(run_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round  accuracy" in proc.stdout and "report:" in proc.stdout
    # The configured port, not one the OS picked.
    assert f"coordinator: 127.0.0.1:{port};" in proc.stdout
    coordinator_log = (run_dir / "logs" / "coordinator.log").read_text()
    assert coordinator_log.count("run finished") == 1  # its log lines are not doubled
    assert (run_dir / "report.html").is_file() and (run_dir / "metrics.csv").is_file()

    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    model_bytes = sum(
        v.nbytes for v in load_file(run_dir / "checkpoints/round-0000.safetensors").values()
    )
    for rec in records[1:]:
        assert rec["status"] == "ok" and rec["num_results"] == 3 and rec["missing"] == []
        assert rec["algorithm"] == "fedavg"
        # Uncompressed fp32: a round's downlink is about silos x model size (framing: < 1%).
        assert 3 * model_bytes <= rec["bytes_down"] <= 3 * model_bytes * 1.01
        assert 3 * model_bytes <= rec["bytes_up"] <= 3 * model_bytes * 1.01
        assert rec["bytes_down_raw"] == rec["bytes_up_raw"] == 3 * model_bytes
        assert {s["silo_id"] for s in rec["silos"]} == {"silo-1", "silo-2", "silo-3"}
        assert all(s["train_seconds"] > 0 and s["bytes_up"] > model_bytes for s in rec["silos"])

        # The aggregate, recomputed here from the decoded uploads and reported sample counts.
        r = rec["round"]
        weights = {s["silo_id"]: s["num_samples"] for s in rec["silos"]}
        uploads = {
            s: load_file(run_dir / f"uploads/round-{r:04d}/{s}.safetensors") for s in weights
        }
        glob = load_file(run_dir / f"checkpoints/round-{r:04d}.safetensors")
        total = sum(weights.values())
        for name, value in glob.items():
            avg = sum(weights[s] * uploads[s][name].astype(np.float64) for s in weights) / total
            if np.issubdtype(value.dtype, np.floating):
                np.testing.assert_allclose(value, avg, rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(value, np.round(avg).astype(value.dtype))
        # Silos really trained: their uploads differ from each other.
        a, b = (uploads[s]["head.3.weight"] for s in ("silo-1", "silo-2"))
        assert not np.array_equal(a, b)

    final = load_file(run_dir / "final_model.safetensors")
    last = load_file(run_dir / "checkpoints/round-0002.safetensors")
    assert all(np.array_equal(final[k], last[k]) for k in last)
    assert records[-1]["global_accuracy"] > 0.2
    assert (run_dir / "report.md").exists() and (run_dir / "metrics.csv").exists()


def test_silo_killed_mid_round_round_completes_at_deadline(tmp_path, write_config):
    # Silos with their own data folders; silo-3 holds 40x more data, so it is still
    # training when it is killed.
    layout_cfg = write_config("gen.yaml")
    from lssfl.common.config import load_config
    from lssfl.dataprep.dataroot import prepare_data_root

    emb = prepare_data_root(load_config(layout_cfg))
    root = tmp_path / "folders"
    for silo, src in emb.silo_dirs.items():
        split = load_split(src)
        reps = 40 if silo == "silo-3" else 1
        save_split(root / silo, split.x.repeat(reps, 1, 1, 1), split.y.repeat(reps))
    test = load_split(emb.test_dir)
    save_split(root / "test", test.x, test.y)
    deadline = 15.0
    config = write_config(
        data={"kind": "folders", "root": str(root)},
        model={"init": "random"},
        coordinator={"round_deadline_s": deadline, "min_silos": 2},
        trainer={"name": "fedavg", "epochs": 2},
    )
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = {}

    def start(name, *args):
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115
        procs[name] = subprocess.Popen(lssfl_cmd(*args), stdout=log, stderr=subprocess.STDOUT)

    try:
        # silo-1 starts first and must wait (backoff) until the coordinator is up.
        port = free_port()
        address = f"127.0.0.1:{port}"

        def start_silo(silo):
            start(
                silo,
                "silo",
                "--coordinator",
                address,
                "--silo-id",
                silo,
                "--data",
                str(root / silo),
            )

        start_silo("silo-1")
        wait_for(lambda: "unavailable" in (logs / "silo-1.log").read_text(), 60, "silo-1 retry")
        start("coordinator", "coordinator", "--config", str(config), "--run-dir", str(run_dir),
              "--port", str(port))  # fmt: skip
        wait_for(lambda: (run_dir / "coordinator.addr").exists(), 120, "coordinator")
        assert (run_dir / "coordinator.addr").read_text() == address
        start_silo("silo-2")
        start_silo("silo-3")

        # An id the config does not enrol is refused with one line.
        intruder = run_lssfl(
            "silo", "--coordinator", address, "--silo-id", "mallory", "--data", str(root / "silo-1")
        )
        assert intruder.returncode == 2
        assert intruder.stderr.strip() == (
            "lssfl: error: the coordinator refused silo 'mallory': unknown silo 'mallory'"
        )

        wait_for(
            lambda: "round=1 silo=silo-3 downloaded" in (logs / "silo-3.log").read_text(),
            120,
            "silo-3 to start round 1",
        )
        procs["silo-3"].send_signal(signal.SIGKILL)
        assert procs["coordinator"].wait(180) == 0, (logs / "coordinator.log").read_text()
        for silo in ("silo-1", "silo-2"):
            assert procs[silo].wait(30) == 0
        assert "joined run" in (logs / "silo-1.log").read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    assert "round=1 silo=silo-3 uploaded" not in (logs / "silo-3.log").read_text()
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    r1, r2 = records[1], records[2]
    assert r1["status"] == "ok" and r1["missing"] == ["silo-3"] and r1["num_results"] == 2
    by_silo = {s["silo_id"]: s for s in r1["silos"]}
    assert by_silo["silo-3"]["status"] == "missing" and by_silo["silo-3"]["bytes_up"] < 1000
    assert by_silo["silo-1"]["status"] == "ok"
    # Dead silos are not asked again: round 2 opens for the two live ones only.
    assert r2["status"] == "ok" and r2["num_results"] == 2 and r2["missing"] == []
    assert "silo-3" not in {s["silo_id"] for s in r2["silos"]}
    # `lssfl coordinator` leaves a run folder as complete as `lssfl run` does.
    csv_rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("round,")
    assert "<html" in (run_dir / "report.html").read_text()
    assert len(list(run_dir.glob("*.png"))) >= 3
    own_log = (run_dir / "logs" / "coordinator.log").read_text()
    assert "round=2" in own_log and "run finished" in own_log
    assert own_log.count("run finished") == 1
    # In this order: round 1 opened for all three, closed early once silo-3 had missed its
    # heartbeats (not at its deadline), and round 2 opened without it.
    events = [
        "round=1 opened for silo-1, silo-2, silo-3",
        "round=1 closing early: silo-3 no heartbeat for",
        "round=1 closed without silo-3",
        "round=1 ok",
        "round=2 opened for silo-1, silo-2\n",
        "round=2 ok",
    ]
    log = (logs / "coordinator.log").read_text()
    positions = [log.find(e) for e in events]
    order = list(zip(events, positions, strict=True))
    assert -1 not in positions and positions == sorted(positions), order


def test_errors_are_one_line_without_traceback(tmp_path, write_config):
    bad = tmp_path / "bad.yaml"
    bad.write_text("silos: [a]\ntrainer: {name: fedavg, epochs: many}\n")
    for args in (["run", "--config", str(bad)], ["coordinator", "--config", str(bad)]):
        proc = run_lssfl(*args)
        assert proc.returncode == 2
        assert proc.stderr == (
            f"lssfl: error: {bad}: trainer.epochs must be an integer, got 'many'\n"
        )

    missing = tmp_path / "nowhere"
    proc = run_lssfl(
        "silo", "--coordinator", "127.0.0.1:9", "--silo-id", "silo-1", "--data", str(missing)
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr
    assert "does not exist" in proc.stderr or "missing" in proc.stderr

    proc = run_lssfl("run", "--config", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and proc.stderr.startswith("lssfl: error: cannot read config")
    assert os.path.exists(tmp_path) and "Traceback" not in proc.stderr


def test_a_model_that_does_not_take_the_data_is_one_line_before_serving(tmp_path, write_config):
    """A model whose input does not match the samples (a torchvision ViT on 16x16 images
    raised a 40-line traceback in the first evaluation) is refused before the coordinator
    serves or pre-trains, and before the folder records the config: the corrected config
    may use the same folder."""
    config = write_config(model={"name": "mlp", "kwargs": {"in_features": 12}, "init": "pretrain"})
    run_dir = tmp_path / "runs" / "wrong-model"
    proc = run_lssfl("coordinator", "--config", str(config), "--run-dir", str(run_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.endswith(
        "ERROR   coordinator model 'mlp' does not take this run's samples of shape [3, 16, 16]: "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x768 and 12x128)"
    ), line
    with contextlib.closing(sqlite3.connect(run_dir / "state.db")) as db:
        assert db.execute("SELECT value FROM run WHERE key = 'identity'").fetchall() == []


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _default_sigint() -> None:
    # A test run started in the background (nohup, `&`) ignores SIGINT, and so would the
    # launcher: Python installs its Ctrl-C handler only where SIGINT is not ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)],
    ids=["ctrl-c", "sigterm", "sigkill"],
)
def test_stopping_the_launcher_stops_coordinator_and_silos(tmp_path, write_config, signum, code):
    """Ctrl-C and SIGTERM stop every process and say so; a launcher killed outright takes
    its coordinator and silos with it (Linux: they get SIGTERM when it dies)."""
    config = write_config(run={"rounds": 500}, model={"init": "random"})
    run_dir = tmp_path / "runs" / "interrupted"
    out = open(tmp_path / "launcher.out", "wb")  # noqa: SIM115
    launcher = subprocess.Popen(
        lssfl_cmd("run", "--config", str(config), "--run-dir", str(run_dir)),
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=_default_sigint,
    )
    try:
        wait_for(lambda: len(_read(run_dir / "metrics.jsonl").splitlines()) >= 2, 120, "round 1")
        assert len(_processes_mentioning(str(tmp_path))) == 5  # launcher, coordinator, 3 silos
        launcher.send_signal(signum)
        assert launcher.wait(30) == code
        wait_for(lambda: not _processes_mentioning(str(tmp_path)), 30, "children to exit")
    finally:
        for pid in _processes_mentioning(str(tmp_path)):  # none left running for other tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out.close()
    said = _read(tmp_path / "launcher.out")
    assert ("interrupted: stopping coordinator and silos" in said) == (signum != signal.SIGKILL)
    assert "stopped before the end of the run" in _read(run_dir / "logs" / "coordinator.log")
    # What was finished is kept: every line of metrics.jsonl is whole.
    assert all(
        json.loads(line)["round"] >= 0 for line in _read(run_dir / "metrics.jsonl").splitlines()
    )


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


def test_silo_gives_up_after_max_wait(tmp_path):
    data = tmp_path / "data"
    save_split(data, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    proc = run_lssfl(
        "silo", "--coordinator", address, "--silo-id", "silo-1", "--data", str(data),
        "--max-wait", "3",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    # It retried with backoff, then gave up with one line naming the coordinator.
    retries = proc.stderr.count("join: coordinator unavailable (UNAVAILABLE); retrying in")
    # Sleeps of 0.5, 1, 2 s... times 0.5-1.5: 3 s are spent after 2 to 4 of them.
    assert 2 <= retries <= 4, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"lssfl: error: coordinator {address} unreachable for (\d+) s \(join\)", last
    )
    assert match and int(match[1]) >= 3, last


def test_lss_guard_rails_reach_the_coordinator_log(tmp_path, write_config):
    """A random start with the paper's affinity is told before round 1; a pool that cannot
    spread (lr 0: every member is the received model) is told after the round, and the
    spread each silo measured is in metrics.jsonl."""
    config = write_config(run={"rounds": 1}, model={"init": "random"})
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"] = {"name": "lss-paper", "pool_size": 2, "epochs_per_member": 1, "lr": 0.0}
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "runs" / "guard"
    proc = run_lssfl("run", "--config", str(config), "--run-dir", str(run_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (run_dir / "logs" / "coordinator.log").read_text()
    assert "lss on a random start (model.init: random)" in log and "lambda_a 3" in log
    assert log.index("random start") < log.index("round=1 ok")
    assert "round=1 the LSS pool collapsed at 3 of 3 silos" in log
    silos = read_jsonl(run_dir / "metrics.jsonl")[1]["silos"]
    assert [s["train_pool_spread"] for s in silos] == [0.0, 0.0, 0.0]
    assert all(s["train_pool_disagreement"] == 0.0 for s in silos)
