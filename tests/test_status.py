"""`lssfl status RUN_DIR` against a running coordinator: read-only, stops nothing."""

import re
import subprocess
import sys

from tests.conftest import free_port, lssfl_cmd, read_jsonl, run_lssfl, wait_for


def test_status_of_a_running_coordinator_then_of_the_finished_run(tmp_path, write_config):
    config = write_config(
        run={"rounds": 1},
        silos=["silo-1", "silo-2"],
        model={"init": "random"},
        coordinator={"min_silos": 2, "heartbeat_interval_s": 0.5, "join_timeout_s": 120},
    )
    run_dir, port = tmp_path / "run", free_port()
    address = f"127.0.0.1:{port}"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(lssfl_cmd(*args), stdout=log, stderr=subprocess.STDOUT)

    def silo(name: str) -> None:
        start(name, "silo", "--coordinator", address, "--silo-id", name,
              "--data", str(tmp_path / "data" / name))  # fmt: skip

    try:
        start("coordinator", "coordinator", "--config", str(config), "--run-dir", str(run_dir),
              "--port", str(port))  # fmt: skip
        wait_for(lambda: (run_dir / "coordinator.addr").exists(), 120, "the coordinator")
        silo("silo-1")
        # silo-2 is not there: the run waits for it, and status says so.
        wait_for(
            lambda: "silo-1  idle" in run_lssfl("status", str(run_dir)).stdout,
            90,
            "silo-1's heartbeat in the status",
        )
        proc = run_lssfl("status", str(run_dir))
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        assert text.startswith(f"run {run_dir.name}: round ")
        assert "silos: 1 live of 2 enrolled" in text and "never joined: silo-2" in text
        assert f"address: {address}" in text
        heard = re.search(r"silo-1  idle +\d+  (\d+) s ago", text)
        assert heard and int(heard.group(1)) <= 10, text
        assert procs["coordinator"].poll() is None  # nothing was stopped
        silo("silo-2")
        assert procs["coordinator"].wait(240) == 0, (logs / "coordinator.log").read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    done = run_lssfl("status", str(run_dir)).stdout
    records = read_jsonl(run_dir / "metrics.jsonl")
    down = sum(r["bytes_down"] for r in records) / 1e6
    assert "round 1 of 1, phase done" in done
    assert f"committed: rounds 0-1, last ok, accuracy {records[-1]['global_accuracy']:.4f}" in done
    assert f"bytes so far: {down:.3f} MB down" in done and down > 0.1


def test_status_of_a_folder_without_a_run_is_one_line(tmp_path):
    proc = run_lssfl("status", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr == f"lssfl: error: {tmp_path} holds no run (no state.db)\n"


def _run_folder(run_dir) -> None:
    """A run folder as a coordinator leaves it mid-round: state.db, config.yaml, address."""
    from lssfl.common.runfolder import ADDRESS_FILE
    from lssfl.server.store import RoundStore

    store = RoundStore(run_dir)
    try:
        store.save_config("run: {rounds: 3}\nsilos: [silo-1, silo-2, silo-3]\n")
        store.put(run_id="study-1", selected='["silo-1", "silo-2"]', reported='["silo-2"]')
        store.set_phase(2, "train")
        store.set_silo("silo-1", "training", 120, "cpu")
        store.set_silo("silo-2", "idle", 80, "cpu")
    finally:
        store.close()
    (run_dir / ADDRESS_FILE).write_text("127.0.0.1:50051\n")


# Through the real entry point (`python -m lssfl`), in a fresh interpreter: another test's
# imports cannot hide one that `lssfl status` makes.
STATUS_IN_A_FRESH_PROCESS = """
import runpy, sys
sys.argv = ["lssfl", "status", sys.argv[1]]
try:
    runpy.run_module("lssfl", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = sorted(m for m in ("torch", "grpc") if m in sys.modules)
print("heavy:", ",".join(heavy) or "none")
"""


def test_status_reads_a_run_folder_without_torch_or_grpc(tmp_path):
    run_dir = tmp_path / "run"
    _run_folder(run_dir)
    proc = subprocess.run(
        [sys.executable, "-c", STATUS_IN_A_FRESH_PROCESS, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    *lines, heavy = proc.stdout.splitlines()
    assert heavy == "heavy: none"
    ago = re.compile(r"\d+ s ago$")
    assert [ago.sub("N s ago", line) for line in lines] == [
        "run study-1: round 2 of 3, phase train",
        "committed: nothing yet",
        "bytes so far: 0.000 MB down, 0.000 MB up",
        "round 2: 1/2 silos reported (silo-2)",
        "address: 127.0.0.1:50051",
        "silos: 2 live of 3 enrolled",
        "  silo    state        samples  last heard",
        "  silo-1  training         120  N s ago",
        "  silo-2  idle              80  N s ago",
        "  never joined: silo-3",
    ]
