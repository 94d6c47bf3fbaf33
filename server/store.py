"""RoundStore: the run folder, with its state in SQLite (WAL) and models in safetensors.

A round is committed in this order: the checkpoint is written to a temporary name,
fsynced and renamed; then one SQLite transaction records the round, its per-silo figures
and the checkpoint's SHA-256. That transaction is the commit point: a crash before it
leaves the previous round as the last one (an orphan checkpoint file is overwritten when
the round runs again), a crash after it leaves the new one. ``metrics.jsonl`` is a readable
copy of the database, rewritten from it on every resume.

Layout of ``runs/<run-id>/``:

    state.db               run config and hash, current round and phase, rounds, silos
    coordinator.lock       held (flock) by the one coordinator serving the folder; its pid
    config.yaml            the effective config
    metrics.jsonl          one JSON object per committed round (round 0: the initial model)
    checkpoints/round-NNNN.safetensors   global model after each round
    checkpoints/held-NNNN.safetensors    with a delta downlink: what silos hold after the
                                         last round's download (its next delta's base)
    final_model.safetensors + model.json  the last global model and its architecture
    uploads/round-NNNN/<silo>.safetensors  accepted uploads of the open round (aggregated
                                           from disk; kept after the round with save_uploads)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lssfl.common.faults import crash_point
from lssfl.common.files import atomic_save_tensors, atomic_write
from lssfl.common.records import RecordError, RoundRecord

# Re-exported: the coordinator takes the heartbeat interval from its store.
from lssfl.common.runfolder import HEARTBEAT_RECORD_S as HEARTBEAT_RECORD_S

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    global_accuracy REAL, global_loss REAL,
    bytes_down INTEGER, bytes_up INTEGER, bytes_down_raw INTEGER, bytes_up_raw INTEGER,
    record TEXT NOT NULL,
    committed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS silo_rounds (
    round INTEGER NOT NULL REFERENCES rounds(round),
    silo_id TEXT NOT NULL,
    status TEXT NOT NULL,
    num_samples INTEGER,
    bytes_down INTEGER, bytes_up INTEGER,
    train_seconds REAL,
    PRIMARY KEY (round, silo_id)
);
CREATE TABLE IF NOT EXISTS silos (
    silo_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    num_samples INTEGER,
    device TEXT,
    updated_at REAL NOT NULL
);
"""


LOCK_FILE = "coordinator.lock"
_CHECKPOINT_RE = re.compile(r"^round-(\d{4,})\.safetensors$")


def _reads(record: str) -> bool:
    try:
        RoundRecord.from_dict(json.loads(record))
    except (RecordError, json.JSONDecodeError):
        return False
    return True


class StoreError(RuntimeError):
    """The run folder cannot be used as it is; the message is one line naming why."""


def state_bytes(state: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    """A state dict as safetensors bytes (CPU, contiguous), with ``meta``."""
    return st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=meta)


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict atomically as a safetensors file."""
    atomic_write(path, state_bytes(state))


def _take_lock(run_dir: Path) -> int:
    """Hold an exclusive flock on the run folder's lock file for this process's lifetime.

    Two coordinators on one folder would overwrite each other's rounds and checkpoints. The
    kernel drops the lock when the holder dies, so a crash never leaves the folder locked.
    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"run folder {run_dir} is in use by another coordinator (pid {holder}); stop it "
            "or choose another --run-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class RoundStore:
    """The run folder: run identity and rounds in SQLite, models in safetensors."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._lock_fd = _take_lock(run_dir)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(run_dir / "state.db", check_same_thread=False)
            self._check_checkpoints()  # before anything is written to the database
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._release()
            raise StoreError(
                f"{run_dir / 'state.db'} is not a readable SQLite database ({exc}); restore it "
                "or choose another --run-dir: nothing was changed"
            ) from None
        except StoreError:
            self._release()
            raise

    def _check_checkpoints(self) -> None:
        """Refuse a database that cannot be the one that wrote the folder's checkpoints.

        A crash can leave one checkpoint past the last committed round (written, not yet
        committed: it is simply written again); more than that, or checkpoints beside a
        database with no run in it, means state.db was lost or replaced, and starting over
        would overwrite committed rounds.
        """
        rounds = [
            int(m.group(1))
            for p in (self.run_dir / "checkpoints").iterdir()
            if (m := _CHECKPOINT_RE.match(p.name))
        ]
        if not rounds:
            return
        tables = {
            name
            for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        last, has_run = None, None
        if {"rounds", "run"} <= tables:
            (last,) = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
            has_run = self._db.execute("SELECT 1 FROM run WHERE key = 'identity'").fetchone()
        if not has_run or max(rounds) > (-1 if last is None else last) + 1:
            raise StoreError(
                f"{self.run_dir} holds checkpoints up to round {max(rounds)} but its state.db "
                + ("has no run" if not has_run else f"ends at round {last}")
                + ": it was lost or replaced; restore it or choose another --run-dir (nothing "
                "was overwritten)"
            )

    def _release(self) -> None:
        os.close(self._lock_fd)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
        self._release()

    # -------------------------------------------------------------- run identity

    def get(self, key: str) -> str | None:
        """A run value (``identity``, ``run_id``, ``round``, ``phase``), or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM run WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, **values: Any) -> None:
        """Set run values."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO run (key, value) VALUES (?, ?)",
                [(k, str(v)) for k, v in values.items()],
            )

    def save_config(self, text: str) -> None:
        """Write config.yaml, the effective config."""
        atomic_write(self.run_dir / "config.yaml", text.encode())

    # -------------------------------------------------------------- rounds

    def checkpoint_path(self, round_num: int) -> Path:
        """Where the global model after ``round_num`` is kept."""
        return self.run_dir / "checkpoints" / f"round-{round_num:04d}.safetensors"

    def held_path(self, round_num: int) -> Path:
        """Where the model silos hold after ``round_num``'s download is kept (delta downlink)."""
        return self.run_dir / "checkpoints" / f"held-{round_num:04d}.safetensors"

    def commit_round(
        self,
        state: dict[str, torch.Tensor],
        record: RoundRecord,
        held: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Checkpoint (and ``held``, the model silos hold after this round's download, when a
        delta downlink makes it differ), then the round's rows in one transaction, then
        metrics.jsonl."""
        r = record.round
        data = state_bytes(state, {"round": str(r)})
        path = self.checkpoint_path(r)
        atomic_write(path, data, crash_tag=f"checkpoint:{r}")
        held_row = []
        if held is not None:
            held_data = state_bytes(held, {"round": str(r)})
            atomic_write(self.held_path(r), held_data)
            held_row = [("held", f"{r}:{hashlib.sha256(held_data).hexdigest()}")]
        crash_point(f"commit:{r}")
        line = json.dumps(record.to_dict())
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    r, record.status, path.name, hashlib.sha256(data).hexdigest(),
                    record.global_accuracy, record.global_loss,
                    record.bytes_down, record.bytes_up,
                    record.bytes_down_raw, record.bytes_up_raw,
                    line, time.time(),
                ),
            )  # fmt: skip
            self._db.executemany(
                "INSERT OR REPLACE INTO silo_rounds VALUES (?,?,?,?,?,?,?)",
                [
                    (r, s.silo_id, s.status, s.num_samples, s.bytes_down, s.bytes_up,
                     s.train_seconds)
                    for s in record.silos
                ],
            )  # fmt: skip
            self._db.executemany(
                "INSERT OR REPLACE INTO run (key, value) VALUES (?, ?)",
                [("round", str(r)), ("phase", "committed"), *held_row],
            )
        if held is not None:
            self.held_path(r - 1).unlink(missing_ok=True)  # only the last one is ever read
        crash_point(f"metrics:{r}")
        with open(self.metrics_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def update_record(self, record: RoundRecord) -> None:
        """Replace a committed round's record (the silos' measures of its model arrive a
        round later), then rewrite metrics.jsonl from the database."""
        line = json.dumps(record.to_dict())
        with self._lock, self._db:
            self._db.execute(
                "UPDATE rounds SET record = ?, global_accuracy = ?, global_loss = ? "
                "WHERE round = ?",
                (line, record.global_accuracy, record.global_loss, record.round),
            )
        self.rewrite_metrics()

    def records(self) -> list[RoundRecord]:
        """The committed rounds in order; StoreError when one is not a record this version reads."""
        with self._lock:
            rows = self._db.execute("SELECT round, record FROM rounds ORDER BY round").fetchall()
        try:
            return [RoundRecord.from_dict(json.loads(record)) for _, record in rows]
        except (RecordError, json.JSONDecodeError) as exc:
            bad = next(r for r, record in rows if not _reads(record))
            raise StoreError(
                f"{self.run_dir / 'state.db'}: round {bad} is not a round record this lssfl "
                f"reads ({exc}); finish it with the lssfl that wrote it, or use another --run-dir"
            ) from None

    def last_round(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The last committed round and its global model, checked against its digest."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, checkpoint, checkpoint_sha256 FROM rounds "
                "ORDER BY round DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        r, name, digest = row
        data = (self.run_dir / "checkpoints" / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"checkpoint {name} does not match its recorded SHA-256")
        return r, st_load(data)

    def held_model(self, round_num: int) -> dict[str, torch.Tensor] | None:
        """What silos held after ``round_num``'s download, if it was stored with that round."""
        value = self.get("held")
        if value is None or int(value.split(":")[0]) != round_num:
            return None
        path = self.held_path(round_num)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != value.split(":")[1]:
            raise StoreError(f"{path.name} does not match its recorded SHA-256")
        return st_load(data)

    def rewrite_metrics(self) -> None:
        """Make metrics.jsonl exactly the committed rounds (drops a line a crash left)."""
        text = "".join(json.dumps(r.to_dict()) + "\n" for r in self.records())
        atomic_write(self.metrics_path, text.encode())

    def set_phase(self, round_num: int, phase: str) -> None:
        """Record the current round and its phase (train, aggregate, done)."""
        self.put(round=round_num, phase=phase)

    def set_silo(self, silo_id: str, status: str, num_samples: int = 0, device: str = "") -> None:
        """Record a silo's status, sample count and device."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO silos VALUES (?,?,?,?,?)",
                (silo_id, status, num_samples, device, time.time()),
            )

    # -------------------------------------------------------------- files

    def uploads_dir(self, round_num: int) -> Path:
        """Where the accepted uploads of ``round_num`` are kept until it is committed."""
        return self.run_dir / "uploads" / f"round-{round_num:04d}"

    def save_upload(
        self, round_num: int, silo_id: str, state: dict[str, torch.Tensor], meta: dict[str, str]
    ) -> Path:
        """Keep an accepted upload (fsync'd, atomic) with ``meta`` (what else the round needs
        of it) under uploads/round-NNNN/; returns its path."""
        folder = self.uploads_dir(round_num)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{silo_id}.safetensors"
        atomic_save_tensors(path, state, meta)
        return path

    def kept_uploads(self, round_num: int) -> dict[str, tuple[Path, dict[str, str]]]:
        """The uploads accepted for ``round_num`` before a restart: silo id -> (path, meta)."""
        folder = self.uploads_dir(round_num)
        if not folder.is_dir():
            return {}
        kept = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("round") == str(round_num) and meta.get("silo") == path.stem:
                kept[path.stem] = (path, meta)
        return kept

    def drop_uploads(self, up_to_round: int) -> None:
        """Delete the kept uploads of rounds up to ``up_to_round`` (committed rounds)."""
        root = self.run_dir / "uploads"
        if not root.is_dir():
            return
        for folder in root.iterdir():
            m = re.match(r"^round-(\d{4,})$", folder.name)
            if m and int(m.group(1)) <= up_to_round:
                shutil.rmtree(folder, ignore_errors=True)

    def save_final(self, state: dict[str, torch.Tensor], model_spec: dict[str, Any]) -> None:
        """Write final_model.safetensors and model.json."""
        save_state(self.run_dir / "final_model.safetensors", state)
        atomic_write(self.run_dir / "model.json", json.dumps(model_spec, indent=2).encode())
