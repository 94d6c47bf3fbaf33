"""A run folder's file names and its status reader: what ``lssfl status`` needs, torch- and
gRPC-free so that the command starts fast (the coordinator writes these files: server/)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

# The coordinator writes "host:port" there once it serves, so that the launcher learns the
# port the OS picked (and ``lssfl status`` shows it).
ADDRESS_FILE = "coordinator.addr"

# `lssfl status` reads silo rows; the coordinator refreshes a silo's row from its heartbeats
# at most this often (each write is an fsync).
HEARTBEAT_RECORD_S = 5.0


def read_status(run_dir: Path) -> dict[str, Any]:
    """A run folder's state.db, opened read-only: what ``lssfl status`` prints.

    ValueError (one line) when the folder holds no run. Safe while a coordinator writes.
    """
    path = run_dir / "state.db"
    if not path.is_file():
        raise ValueError(f"{run_dir} holds no run (no state.db)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        run = dict(db.execute("SELECT key, value FROM run").fetchall())
        committed = db.execute(
            "SELECT COUNT(*), MAX(round), SUM(bytes_down), SUM(bytes_up) FROM rounds"
        ).fetchone()
        last = db.execute(
            "SELECT round, status, global_accuracy FROM rounds ORDER BY round DESC LIMIT 1"
        ).fetchone()
        silos = db.execute(
            "SELECT silo_id, status, num_samples, device, updated_at FROM silos ORDER BY silo_id"
        ).fetchall()
    except sqlite3.Error as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    finally:
        db.close()
    return {
        "selected": _silo_list(run.get("selected")),  # of the round in progress
        "reported": _silo_list(run.get("reported")),
        "run_id": run.get("run_id", run_dir.name),
        "round": int(run.get("round", 0)),
        "phase": run.get("phase", "starting"),
        "rounds_committed": committed[0],
        "bytes_down": committed[2] or 0,
        "bytes_up": committed[3] or 0,
        "last_round": None
        if last is None
        else {"round": last[0], "status": last[1], "global_accuracy": last[2]},
        "silos": [
            {"silo_id": r[0], "status": r[1], "num_samples": r[2], "device": r[3], "seen_at": r[4]}
            for r in silos
        ],
    }


def _silo_list(text: str | None) -> list[str]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []
