"""A silo on its own virtual host (network namespace); its link is cut mid-round and
restored. Needs root and `ip netns`; skipped with the reason otherwise.

Addresses are link-local (169.254.201.0/30) on a veth pair this test creates and deletes:
traffic never leaves this machine.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port, read_jsonl, wait_for

# Real OS processes, gRPC over sockets: minutes on 2 cores (`pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow

NS = f"lssfl-t{os.getpid()}"
HOST_IF, NS_IF = f"lsv{os.getpid() % 100000}a", f"lsv{os.getpid() % 100000}b"
HOST_IP, NS_IP = "169.254.201.1", "169.254.201.2"


def _ip(*args: str, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def _netns_reason() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = _ip("netns", "add", NS + "p")
    if probe.returncode != 0:
        return f"ip netns add is not allowed here: {probe.stderr.strip()}"
    _ip("netns", "del", NS + "p")
    return None


REASON = _netns_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def virtual_host():
    steps = [
        ("netns", "add", NS),
        ("link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF),
        ("link", "set", NS_IF, "netns", NS),
        ("addr", "add", f"{HOST_IP}/30", "dev", HOST_IF),
        ("link", "set", HOST_IF, "up"),
    ]
    try:
        for step in steps:
            assert _ip(*step).returncode == 0, step
        for step in [("addr", "add", f"{NS_IP}/30", "dev", NS_IF), ("link", "set", NS_IF, "up"),
                     ("link", "set", "lo", "up")]:  # fmt: skip
            assert _ip(*step, ns=NS).returncode == 0, step
        yield
    finally:
        _ip("link", "del", HOST_IF)
        _ip("netns", "del", NS)


def test_cut_and_restored_link_mid_round(tmp_path, write_config, virtual_host):
    port = free_port()
    config = write_config(
        silos=["silo-1", "silo-2"],
        model={"init": "random"},
        # A silo silent for 3 intervals + 2 s (8 s) is given up; the cut is shorter.
        coordinator={"host": HOST_IP, "port": port, "min_silos": 2, "round_deadline_s": 90,
                     "heartbeat_interval_s": 2.0},
        trainer={"name": "fedavg", "epochs": 3},
    )  # fmt: skip
    from lssfl.common.config import load_config
    from lssfl.dataprep.dataroot import prepare_data_root

    data = prepare_data_root(load_config(config))
    run_dir = tmp_path / "run"
    logs = {n: tmp_path / f"{n}.log" for n in ("coordinator", "silo-1", "silo-2")}
    lssfl = [sys.executable, "-m", "lssfl"]
    address = f"{HOST_IP}:{port}"

    def silo(name: str, prefix: list[str]) -> subprocess.Popen:
        args = ["silo", "--coordinator", address, "--silo-id", name, "--data"]
        return subprocess.Popen(
            [*prefix, *lssfl, *args, str(data.silo_dirs[name])],
            stdout=open(logs[name], "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )

    procs = [
        subprocess.Popen(
            [*lssfl, "coordinator", "--config", str(config), "--run-dir", str(run_dir)],
            stdout=open(logs["coordinator"], "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        wait_for(lambda: (run_dir / "coordinator.addr").exists(), 120, "coordinator")
        procs.append(silo("silo-1", []))
        procs.append(silo("silo-2", ["ip", "netns", "exec", NS]))  # its own virtual host
        wait_for(
            lambda: "round=1 silo=silo-2 downloaded" in logs["silo-2"].read_text(), 120, "round 1"
        )
        assert _ip("link", "set", HOST_IF, "down").returncode == 0  # cut silo-2 off
        time.sleep(4)
        assert _ip("link", "set", HOST_IF, "up").returncode == 0
        assert procs[0].wait(180) == 0, logs["coordinator"].read_text()
        assert procs[1].wait(30) == 0 and procs[2].wait(60) == 0, logs["silo-2"].read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    # silo-2 got its result in once the link was back: no round lost, nobody missing.
    assert all(r["num_results"] == 2 and r["missing"] == [] for r in records[1:])
