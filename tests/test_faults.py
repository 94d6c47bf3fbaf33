"""Fault injection with real processes: kill the coordinator or a silo at exact instants,
restart, and check that the run ends with the same model as an uninterrupted one.

Crash points (``LSSFL_CRASH_AT=<point>:<round>``, see lssfl.common.faults) make a process
SIGKILL itself at one instant; "training" is a SIGKILL sent by the test while silos train.
"""

import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.numpy import load_file

from lssfl.dataprep.splits import save_split
from tests.conftest import free_port, lssfl_cmd, make_config, read_jsonl, wait_for

# Real OS processes, gRPC over sockets: minutes on 2 cores (`pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow

ROUNDS = 3
SILOS = ("silo-1", "silo-2")
SECTIONS = {
    "run": {"rounds": ROUNDS},
    "silos": list(SILOS),
    "model": {"init": "random"},
    # A silo silent for 3 intervals + 2 s (6.5 s) is given up: a killed silo restarts sooner.
    "coordinator": {"min_silos": 2, "round_deadline_s": 120, "heartbeat_interval_s": 1.5},
    "trainer": {"name": "fedavg", "epochs": 1, "lr": 0.003},
}


class Cluster:
    def __init__(self, tmp_path: Path, config: Path, name: str) -> None:
        self.config = config
        self.run_dir = tmp_path / name
        self.logs = tmp_path / f"{name}-logs"
        self.logs.mkdir()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data = config.parent / "data"
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts = 0

    def _start(self, name: str, args: list[str], crash_at: str | None) -> None:
        env = dict(os.environ)
        env.pop("LSSFL_CRASH_AT", None)
        if crash_at:
            env["LSSFL_CRASH_AT"] = crash_at
        self.starts += 1
        log = open(self.logs / f"{name}-{self.starts}.log", "wb")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            lssfl_cmd(*args), stdout=log, stderr=subprocess.STDOUT, env=env
        )

    def coordinator(self, crash_at: str | None = None, config: Path | None = None) -> None:
        config = config or self.config
        args = ["coordinator", "--config", str(config), "--run-dir", str(self.run_dir)]
        self._start("coordinator", [*args, "--port", str(self.port)], crash_at)

    def silo(self, silo: str, crash_at: str | None = None) -> None:
        args = ["silo", "--coordinator", self.address, "--silo-id", silo]
        self._start(silo, [*args, "--data", str(self.data / silo)], crash_at)

    def log_text(self, name: str) -> str:
        return "".join(p.read_text() for p in sorted(self.logs.glob(f"{name}-*.log")))

    def wait(self, name: str, timeout: float = 120) -> int:
        return self.procs[name].wait(timeout)

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def final(self) -> dict:
        return load_file(self.run_dir / "final_model.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Config and embedded data shared by every cluster of this module."""
    from lssfl.common.config import load_config
    from lssfl.dataprep.dataroot import prepare_data_root

    root = tmp_path_factory.mktemp("faults")
    config = make_config(root, **SECTIONS)
    prepare_data_root(load_config(config))
    return root, config


def _run(
    cluster: Cluster,
    coordinator_crash: str | None = None,
    silo_crash=None,
    kill=None,
    first_config: Path | None = None,
):
    """Run to the end; a crash (or kill) of the coordinator is followed by one restart
    (with the cluster's config; ``first_config`` for the start before the crash)."""
    try:
        cluster.coordinator(coordinator_crash, first_config)
        for silo in SILOS:
            cluster.silo(silo, silo_crash if silo == "silo-2" else None)
        if kill:
            kill(cluster)
        if silo_crash:
            assert cluster.wait("silo-2") == -signal.SIGKILL, cluster.log_text(
                "silo-2"
            ) + cluster.log_text("coordinator")
            cluster.silo("silo-2")  # it comes back after the crash
        code = cluster.wait("coordinator", 180)
        if coordinator_crash or kill:
            assert code == -signal.SIGKILL, cluster.log_text("coordinator")
            cluster.coordinator()
            code = cluster.wait("coordinator", 180)
        assert code == 0, cluster.log_text("coordinator")
        for silo in SILOS:
            assert cluster.wait(silo, 60) == 0, cluster.log_text(silo)
    finally:
        cluster.kill_all()


@pytest.fixture(scope="module")
def reference(base):
    root, config = base
    cluster = Cluster(root, config, "reference")
    _run(cluster)
    return cluster.final()


# LSS, a lossy delta downlink and top-k uplink with error feedback in one run: what silos
# hold and the residuals they keep are the state a resumed run must get exactly right.
CODEC_SECTIONS = {
    **SECTIONS,
    "trainer": {"name": "lss", "pool_size": 2, "epochs_per_member": 1, "lr": 0.003},
    "compression": {"uplink": "topk0.1+int8", "downlink": "fp16", "delta_downlink": True},
}


@pytest.fixture(scope="module")
def codec_reference(base):
    root, _ = base
    config = make_config(root, "codecs.yaml", **CODEC_SECTIONS)
    # make_config merges sections into its defaults: drop fedavg's `epochs`, which lss lacks.
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"] = CODEC_SECTIONS["trainer"]
    config.write_text(yaml.safe_dump(cfg))
    cluster = Cluster(root, config, "codec-reference")
    _run(cluster)
    return config, cluster.final()


def _check(cluster: Cluster, reference: dict) -> None:
    con = sqlite3.connect(cluster.run_dir / "state.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rounds = [r for (r,) in con.execute("SELECT round FROM rounds ORDER BY round")]
    assert rounds == list(range(ROUNDS + 1))
    con.close()
    records = read_jsonl(cluster.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    assert all(r["status"] in ("initial", "ok") and r["missing"] == [] for r in records)
    final = cluster.final()
    assert final.keys() == reference.keys()
    for name, value in reference.items():
        assert (final[name] == value).all(), f"{name} differs from the uninterrupted run"


# Aggregation is killed in the LSS test below; "accepted:2:silo-1" right after silo-1's
# round-2 upload was accepted (on disk, before its reply).
@pytest.mark.parametrize("point", ["accepted:2:silo-1", "checkpoint:2", "commit:2"])
def test_coordinator_killed_and_resumed_matches_uninterrupted(tmp_path, base, reference, point):
    cluster = Cluster(tmp_path, base[1], f"crash-{point.replace(':', '-')}")
    _run(cluster, coordinator_crash=point)
    coordinator = cluster.log_text("coordinator")
    assert "resuming run" in coordinator
    assert "joining again" in cluster.log_text("silo-1")
    # Uploads accepted before the crash count in the resumed round: silo-1 trains it once.
    assert "round=2 silo=silo-1 upload kept from before the restart" in coordinator
    assert cluster.log_text("silo-1").count("round=2 silo=silo-1 trained") == 1
    assert not any((cluster.run_dir / "uploads").glob("*/*"))  # dropped once committed
    _check(cluster, reference)


def test_lss_delta_downlink_and_topk_feedback_resume_bit_exact(tmp_path, codec_reference):
    """Killed after every round-2 upload arrived: round 2 runs again. The silos, still up,
    start it from the residuals they held before its first try, and the resumed coordinator
    sends the delta against what they hold after round 1 (stored with that round)."""
    config, reference = codec_reference
    cluster = Cluster(tmp_path, config, "codec-crash")
    _run(cluster, coordinator_crash="aggregate:2")
    assert "resuming run" in cluster.log_text("coordinator")
    # Both uploads were on disk: the resumed round aggregates them, nobody trains again.
    for silo in SILOS:
        assert f"round=2 silo={silo} upload kept from before the restart" in (
            cluster.log_text("coordinator")
        )
    # Trained round 2 once. (Its reply may be lost: the coordinator can die between keeping
    # the last upload, which closes the round, and answering it; the silo then asks again.)
    for silo in SILOS:
        assert cluster.log_text(silo).count(f"round=2 silo={silo} trained") == 1
    _check(cluster, reference)
    records = read_jsonl(cluster.run_dir / "metrics.jsonl")
    assert all(r["codec_up"] == "topk0.1+int8" and r["delta_downlink"] for r in records)


def test_crash_between_commit_and_metrics_line_then_resume_with_more_rounds(
    tmp_path, base, reference
):
    """A run of ROUNDS - 1 rounds is killed after its last round's database commit, before
    that round's metrics.jsonl line; resumed with ROUNDS rounds, it rewrites the file and ends
    where an uninterrupted run of ROUNDS rounds ends."""
    root, config = base
    shorter = make_config(root, "shorter.yaml", **{**SECTIONS, "run": {"rounds": ROUNDS - 1}})
    cluster = Cluster(tmp_path, config, "crash-metrics")
    _run(cluster, coordinator_crash=f"metrics:{ROUNDS - 1}", first_config=shorter)
    assert f"after committed round {ROUNDS - 1}" in cluster.log_text("coordinator")
    _check(cluster, reference)


@pytest.mark.parametrize(
    "section, change, named",
    [
        ("data", {"data": {"alpha": 0.5}}, "data.alpha: None -> 0.5"),
        ("model", {"model": {"init": "random", "pretrain_epochs": 3}}, "model.pretrain_epochs"),
        ("trainer", {"trainer": {"name": "fedprox", "epochs": 1, "lr": 0.003}}, "trainer.name"),
        ("silos", {"silos": [*SILOS, "silo-3"]}, "silos: ['silo-1', 'silo-2'] -> "),
        ("seed", {"run": {"rounds": ROUNDS, "seed": 1}}, "seed: 0 -> 1"),
    ],
)
def test_each_changed_key_is_refused_on_resume(base, reference, caplog, section, change, named):
    from lssfl.common.config import load_config
    from lssfl.server.app import run_coordinator
    from lssfl.training.spec import resolve_trainer

    root, _ = base
    changed = make_config(root, f"changed-{section}.yaml", **{**SECTIONS, **change})
    run_dir = root / "reference"
    before = (run_dir / "state.db").read_bytes()
    assert run_coordinator(resolve_trainer(load_config(changed)), run_dir) == 2
    assert "holds a run with a different config" in caplog.text
    assert named in caplog.text
    assert (run_dir / "state.db").read_bytes() == before


def test_coordinator_killed_during_training(tmp_path, base, reference):
    def kill(cluster):
        wait_for(
            lambda: "round=2 silo=silo-1 downloaded" in cluster.log_text("silo-1"), 120, "round 2"
        )
        cluster.procs["coordinator"].send_signal(signal.SIGKILL)

    cluster = Cluster(tmp_path, base[1], "crash-training")
    _run(cluster, kill=kill)
    _check(cluster, reference)


def test_silo_killed_mid_upload_comes_back(tmp_path, base, reference):
    cluster = Cluster(tmp_path, base[1], "silo-crash")
    _run(cluster, silo_crash="upload:2")
    assert "upload:2" not in cluster.log_text("silo-2")  # it died without a word
    _check(cluster, reference)


def test_changed_config_is_refused_on_resume(base, reference):
    root, config = base
    changed = make_config(
        root,
        "changed.yaml",
        **{**SECTIONS, "trainer": {"name": "fedavg", "epochs": 2, "lr": 0.003}},
    )
    proc = subprocess.run(
        lssfl_cmd("coordinator", "--config", str(changed), "--run-dir", str(root / "reference")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "holds a run with a different config (trainer.epochs: 1 -> 2)" in proc.stderr
    con = sqlite3.connect(root / "reference" / "state.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT max(round) FROM rounds").fetchone()[0] == ROUNDS


def test_corrupted_checkpoint_is_refused_on_resume(tmp_path, base, reference):
    root, config = base
    run_dir = tmp_path / "copy"
    shutil.copytree(root / "reference", run_dir)
    last = run_dir / "checkpoints" / f"round-{ROUNDS:04d}.safetensors"
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    proc = subprocess.run(
        lssfl_cmd("coordinator", "--config", str(config), "--run-dir", str(run_dir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"checkpoint round-{ROUNDS:04d}.safetensors does not match its recorded SHA-256" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    # Nothing was rewritten: the database and the other checkpoints are as they were.
    con = sqlite3.connect(run_dir / "state.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT max(round) FROM rounds").fetchone()[0] == ROUNDS
    assert (run_dir / "checkpoints" / "round-0002.safetensors").read_bytes() == (
        root / "reference" / "checkpoints" / "round-0002.safetensors"
    ).read_bytes()


def test_silo_whose_data_does_not_fit_is_refused_at_join_then_sigterm_while_waiting(tmp_path, base):
    _, config = base
    cluster = Cluster(tmp_path, config, "misfit")
    wrong = tmp_path / "wrong-shape"
    save_split(wrong, torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), {"num_classes": 10})
    cluster.coordinator()
    try:
        args = ["silo", "--coordinator", cluster.address, "--silo-id", "silo-1"]
        cluster._start("silo-1", [*args, "--data", str(wrong)], None)
        assert cluster.wait("silo-1", 120) == 2
        said = "data samples have shape [1, 8, 8], the model takes [3, 16, 16]"
        silo_log = cluster.log_text("silo-1")
        assert said in silo_log and "Traceback" not in silo_log
        wait_for(lambda: said in cluster.log_text("coordinator"), 30, "the refusal logged")
        # Nobody joined: SIGTERM now is a stop, not a join timeout.
        cluster.procs["coordinator"].send_signal(signal.SIGTERM)
        assert cluster.wait("coordinator", 60) == 130
        log = cluster.log_text("coordinator")
        assert "stopped before the end of the run" in log and "joined within" not in log
        assert len([line for line in log.splitlines() if said in line]) == 1
    finally:
        cluster.kill_all()
