"""One coordinator per run folder and port, and a folder whose state.db was lost is refused.

Real `lssfl coordinator` processes; each refusal is one line on stderr, exit status 2, and
leaves every file of the run folder as it was.
"""

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from lssfl.server.store import LOCK_FILE, RoundStore, StoreError
from tests.conftest import free_port, lssfl_cmd, run_lssfl, wait_for

SECTIONS = {"model": {"init": "random"}, "coordinator": {"join_timeout_s": 600}}
# Start-up (imports, data, initial model) takes seconds alone and much longer on a loaded
# machine: generous bounds, never asserted as timings.
STARTUP_S = 240


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def _refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    errors = [
        line for line in proc.stderr.splitlines() if " ERROR " in line or "lssfl: error" in line
    ]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_a_second_coordinator_on_the_same_folder_is_refused_with_the_holders_pid(
    tmp_path, write_config
):
    config = write_config(**SECTIONS)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        lssfl_cmd("coordinator", "--config", str(config), "--run-dir", str(run_dir),
                  "--port", str(free_port())),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: (run_dir / "coordinator.addr").exists(), STARTUP_S, "the coordinator")
        before = _snapshot(run_dir)
        second = run_lssfl(
            "coordinator", "--config", str(config), "--run-dir", str(run_dir),
            "--port", str(free_port()), timeout=STARTUP_S,
        )  # fmt: skip
        line = _refusal(second)
        assert f"is in use by another coordinator (pid {first.pid})" in line
        assert first.poll() is None  # the first one keeps serving
        assert _snapshot(run_dir) == before
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)


def test_the_lock_goes_with_the_holder(tmp_path):
    store = RoundStore(tmp_path)
    with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
        RoundStore(tmp_path)
    store.close()
    RoundStore(tmp_path).close()  # released on close (and by the kernel when a holder dies)


def test_a_port_in_use_is_one_line(tmp_path, write_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(**SECTIONS)
        proc = run_lssfl(
            "coordinator", "--config", str(config), "--run-dir", str(tmp_path / "run"),
            "--port", str(port), timeout=STARTUP_S,
        )  # fmt: skip
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in _refusal(proc)


def _folder_with_checkpoints(run_dir: Path, rounds: int) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    for r in range(rounds):
        (run_dir / "checkpoints" / f"round-{r:04d}.safetensors").write_bytes(b"model %d" % r)


@pytest.mark.parametrize(
    "db, message",
    [
        (b"", "holds checkpoints up to round 2 but its state.db has no run"),
        (b"SQLite format 3\x00" + b"\x13" * 200, "is not a readable SQLite database"),
        (b"garbage" * 100, "is not a readable SQLite database"),
    ],
)
def test_a_lost_or_broken_state_db_is_refused_and_nothing_is_overwritten(
    tmp_path, write_config, db, message
):
    run_dir = tmp_path / "run"
    _folder_with_checkpoints(run_dir, 3)
    (run_dir / "state.db").write_bytes(db)
    before = _snapshot(run_dir)
    proc = run_lssfl(
        "coordinator", "--config", str(write_config(**SECTIONS)), "--run-dir", str(run_dir),
        "--port", str(free_port()), timeout=STARTUP_S,
    )  # fmt: skip
    assert message in _refusal(proc)
    assert _snapshot(run_dir) == before


def test_one_orphan_checkpoint_is_what_a_crash_leaves_and_is_accepted(tmp_path):
    store = RoundStore(tmp_path)
    store.put(identity="{}")
    store.close()
    _folder_with_checkpoints(tmp_path / "x", 0)
    # round 0 written but not committed: a crash between the checkpoint and the commit
    (tmp_path / "checkpoints" / "round-0000.safetensors").write_bytes(b"model")
    RoundStore(tmp_path).close()
    (tmp_path / "checkpoints" / "round-0001.safetensors").write_bytes(b"model")
    with pytest.raises(StoreError, match="up to round 1 but its state.db ends at round None"):
        RoundStore(tmp_path)
