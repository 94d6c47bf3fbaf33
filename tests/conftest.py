import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# Several processes share two cores in these tests: one thread each avoids oversubscription
# (inherited by every coordinator and silo the tests start).
os.environ["OMP_NUM_THREADS"] = "1"


def lssfl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lssfl", *args]


def run_lssfl(*args: str, timeout: float = 120, cwd: Path | None = None):
    return subprocess.run(
        lssfl_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_config(folder: Path, name: str = "run.yaml", **sections) -> Path:
    """Write a small, fast run config into folder; sections are merged into the defaults."""
    cfg = {
        "run": {"name": "t", "seed": 0, "rounds": 2, "out_dir": str(folder / "runs")},
        "silos": ["silo-1", "silo-2", "silo-3"],
        "coordinator": {"min_silos": 2, "round_deadline_s": 60, "join_timeout_s": 60,
                        "heartbeat_interval_s": 0.5},
        "data": {"kind": "embedded", "root": str(folder / "data")},
        "model": {"name": "cnn", "init": "pretrain", "pretrain_epochs": 2},
        "trainer": {"name": "fedavg", "epochs": 1, "lr": 0.003},
    }  # fmt: skip
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def write_config(tmp_path):
    def write(name: str = "run.yaml", **sections) -> Path:
        return make_config(tmp_path, name, **sections)

    return write
