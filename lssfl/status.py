"""``lssfl status RUN_DIR``: where a run stands, read from its state.db without touching it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from lssfl.common.runfolder import ADDRESS_FILE, HEARTBEAT_RECORD_S, read_status


def _config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def round_progress(round_num: int, selected: int, reported: list[str]) -> str:
    """``round 3: 2/3 silos reported (silo-1, silo-3)``."""
    names = f" ({', '.join(reported)})" if reported else ""
    return f"round {round_num}: {len(reported)}/{selected} silos reported{names}"


def open_round_progress(status: dict[str, Any]) -> str | None:
    """``round_progress`` of the round in progress, from ``read_status``; None between rounds."""
    if status["phase"] not in ("train", "aggregate") or not status["selected"]:
        return None
    return round_progress(status["round"], len(status["selected"]), status["reported"])


def describe(run_dir: Path, now: float | None = None) -> str:
    """``lssfl status``: the run folder's round, phase and silos as text."""
    status = read_status(run_dir)
    cfg = _config(run_dir)
    now = time.time() if now is None else now
    rounds = cfg.get("run", {}).get("rounds")
    interval = float(cfg.get("coordinator", {}).get("heartbeat_interval_s", 2.0))
    # The coordinator's own rule (3 missed beats), plus how stale a stored row may be.
    live_within = 3 * interval + 2.0 + HEARTBEAT_RECORD_S
    last = status["last_round"]
    lines = [
        f"run {status['run_id']}: round {status['round']}"
        + (f" of {rounds}" if rounds else "")
        + f", phase {status['phase']}",
        "committed: "
        + (
            f"rounds 0-{last['round']}, last {last['status']}, accuracy "
            + (
                "pending (silos measure it next round)"
                if last["global_accuracy"] is None
                else f"{last['global_accuracy']:.4f}"
            )
            if last
            else "nothing yet"
        ),
        f"bytes so far: {status['bytes_down'] / 1e6:.3f} MB down, "
        f"{status['bytes_up'] / 1e6:.3f} MB up",
    ]
    progress = open_round_progress(status)
    if progress:
        lines.append(progress)
    if (run_dir / ADDRESS_FILE).is_file():
        lines.append(f"address: {(run_dir / ADDRESS_FILE).read_text().strip()}")
    silos = status["silos"]
    done = status["phase"] == "done"
    live = [s for s in silos if done or now - s["seen_at"] <= live_within]
    enrolled = cfg.get("silos") or [s["silo_id"] for s in silos]
    if not done:
        lines.append(f"silos: {len(live)} live of {len(enrolled)} enrolled")
    if silos:
        width = max(len(s["silo_id"]) for s in silos)
        lines.append(f"  {'silo':{width}}  {'state':11}  {'samples':>7}  last heard")
        for s in silos:
            state = s["status"] if s in live else "lost"
            lines.append(
                f"  {s['silo_id']:{width}}  {state:11}  {s['num_samples']:>7}  "
                f"{now - s['seen_at']:.0f} s ago"
            )
    missing = sorted(set(enrolled) - {s["silo_id"] for s in silos})
    if missing:
        lines.append(f"  never joined: {', '.join(missing)}")
    return "\n".join(lines)
