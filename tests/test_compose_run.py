"""The container demo in deploy/ without a Docker engine: its services, run.

The compose file is read as Docker Compose reads it, and every service runs as a local
process with its own command, environment, volumes and health check: named volumes and
image folders become folders under tmp_path, container paths in the arguments and in the
run config are rewritten to them, `coordinator:50051` becomes 127.0.0.1 on a free port.
So the commands in deploy/docker-compose.yml are the ones that are proven to work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import read_jsonl
from tests.test_compose import (
    ROOT,
    Image,
    argv_of,
    depends_on,
    load_compose,
    named_volumes,
    option,
    read_image,
)

# Real OS processes, gRPC over sockets: minutes on 2 cores (`pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- emulation


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seconds(text: str | None, default: float) -> float:
    if text is None:
        return default
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|s|m|h)", str(text)):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


@dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    health: list[str] | None
    tmpfs: list[Path]
    log: Path
    proc: subprocess.Popen | None = None
    healthy: bool = False
    health_output: str = ""
    starts: int = 0

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({' '.join(self.argv)}):\n{text[-4000:]}"


class ComposeEmulator:
    """Runs the services of a compose file as local processes, in dependency order."""

    def __init__(self, compose: dict, image: Image, tmp: Path) -> None:
        self.compose, self.image, self.tmp = compose, image, tmp
        self.services: dict[str, dict] = compose["services"]
        self.volumes = tmp / "volumes"
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True)
        # Every published or exposed container port gets a free port on 127.0.0.1.
        self.ports = {
            int(str(p).split(":")[-1]): _free_port()
            for svc in self.services.values()
            for p in svc.get("ports", [])
        }
        # `lssfl` on PATH (for `sh -c` commands) is this interpreter's, like the image's.
        self.bin = tmp / "bin"
        self.bin.mkdir()
        shim = self.bin / "lssfl"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lssfl "$@"\n')
        shim.chmod(0o755)
        self.containers = {name: self._container(name) for name in self.services}

    # ---------------------------------------------------------------- mapping

    def mounts(self, name: str) -> dict[str, Path]:
        """Container path -> local folder: image files, named volumes, tmpfs."""
        svc = self.services[name]
        home = self.tmp / "containers" / name
        mounts = {"/app": home / "app"}  # the image's WORKDIR, with its configs/
        for volume, target, _ in named_volumes(svc):
            mounts[target] = self.volumes / volume
        for i, target in enumerate(self.tmpfs_targets(name)):
            mounts[target] = home / f"tmpfs-{i}"
        return mounts

    def tmpfs_targets(self, name: str) -> list[str]:
        tmpfs = self.services[name].get("tmpfs", [])
        return [tmpfs] if isinstance(tmpfs, str) else list(tmpfs)

    def rewrite(self, text: str, mounts: dict[str, Path]) -> str:
        names = "|".join(re.escape(n) for n in sorted(self.services, key=len, reverse=True))
        text = re.sub(rf"(?<![\w.-])(?:{names}):(?=\d)", "127.0.0.1:", text)
        for inside, outside in self.ports.items():
            text = re.sub(rf"(?<![\w.]){inside}(?![\w.])", str(outside), text)
        text = text.replace("0.0.0.0", "127.0.0.1")  # the container's network: loopback
        prefixes = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        return re.sub(
            rf"(?<![\w./-])({prefixes})(?=/|$|[^\w.-])",
            lambda m: str(mounts[m.group(1)]),
            text,
            flags=re.M,
        )

    def _local(self, argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "lssfl", *argv[1:]] if argv[0] == "lssfl" else argv

    def _container(self, name: str) -> Container:
        svc = self.services[name]
        mounts = self.mounts(name)
        # The image's files: configs/ under /app, rewritten for this container's mounts.
        for src, dest in self.image.copies:
            if dest.startswith("/app/"):
                target = mounts["/app"] / Path(dest).relative_to("/app")
                target.mkdir(parents=True)
                for file in (ROOT / src).glob("*.yaml"):
                    (target / file.name).write_text(self.rewrite(file.read_text(), mounts))
        for path in mounts.values():
            path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        environment = svc.get("environment", {})
        if isinstance(environment, list):
            environment = dict(e.split("=", 1) for e in environment)
        env.update({k: self.rewrite(str(v), mounts) for k, v in environment.items()})
        argv = [self.rewrite(a, mounts) for a in argv_of(svc, self.image)]
        health = None
        if "healthcheck" in svc:
            test = svc["healthcheck"]["test"]
            if isinstance(test, str):
                test = ["CMD-SHELL", test]
            kind, *rest = test
            health = rest if kind == "CMD" else ["sh", "-c", *rest]
            health = [self.rewrite(a, mounts) for a in health]
        workdir = svc.get("working_dir", self.image.workdir)
        return Container(
            name=name,
            argv=self._local(argv),
            env=env,
            cwd=Path(self.rewrite(workdir, mounts)),
            health=self._local(health) if health else None,
            tmpfs=[mounts[t] for t in self.tmpfs_targets(name)],
            log=self.logs / f"{name}.log",
        )

    # ---------------------------------------------------------------- running

    def start(self, name: str) -> None:
        c = self.containers[name]
        for path in c.tmpfs:
            path.mkdir(parents=True, exist_ok=True)
        with open(c.log, "ab") as log:
            c.proc = subprocess.Popen(
                c.argv, cwd=c.cwd, env=c.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        c.healthy, c.starts = False, c.starts + 1

    def _dependencies_met(self, name: str) -> bool:
        for dep, spec in depends_on(self.services[name]).items():
            d = self.containers[dep]
            condition = spec.get("condition", "service_started")
            code = None if d.proc is None else d.proc.poll()
            if condition == "service_completed_successfully":
                if code is None:
                    return False
                assert code == 0, f"{dep} failed with exit code {code}\n{d.tail()}"
            elif condition == "service_healthy":
                if d.proc is not None and code is not None and not d.healthy:
                    raise AssertionError(f"{dep} exited before it was healthy\n{d.tail()}")
                if not d.healthy:
                    return False
            elif d.proc is None:
                return False
        return True

    def _awaited(self, name: str) -> bool:
        """Whether a service not yet started waits for `name` to be healthy.

        Docker probes all the time; here a probe (a process that imports torch) runs only
        while its answer gates something, to spare the test machine's two cores.
        """
        return any(
            c.proc is None
            and depends_on(self.services[other]).get(name, {}).get("condition") == "service_healthy"
            for other, c in self.containers.items()
        )

    def _check_health(self, c: Container) -> None:
        timeout = _seconds(self.services[c.name]["healthcheck"].get("timeout"), 30)
        try:
            probe = subprocess.run(
                c.health, cwd=c.cwd, env=c.env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return
        c.health_output = probe.stdout + probe.stderr
        c.healthy = probe.returncode == 0

    def step(self) -> bool:
        """Start what can start, probe health, reap; True while anything is running or due."""
        busy = False
        for name, c in self.containers.items():
            if c.proc is None:
                busy = True
                if self._dependencies_met(name):
                    self.start(name)
            elif c.proc.poll() is None:
                busy = True
                if c.health and not c.healthy and self._awaited(name):
                    self._check_health(c)
            else:
                for path in c.tmpfs:  # a tmpfs is gone when its container stops
                    shutil.rmtree(path, ignore_errors=True)
        return busy

    def run_until(self, predicate, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if not self.step():
                return
            assert time.monotonic() < end, "timed out\n" + self.tails()
            time.sleep(0.1)

    def restart(self, name: str, timeout: float = 60) -> int:
        """`docker compose restart NAME`: SIGTERM, wait, start the same container again."""
        c = self.containers[name]
        assert c.proc is not None
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
        code = c.proc.wait(timeout)
        self.start(name)
        return code

    def one_shot(self) -> list[str]:
        """Services that others wait for to complete (depends_on: completed_successfully)."""
        return sorted(
            {
                dep
                for svc in self.services.values()
                for dep, spec in depends_on(svc).items()
                if spec.get("condition") == "service_completed_successfully"
            }
        )

    def exit_codes(self) -> dict[str, int | None]:
        return {n: (c.proc.poll() if c.proc else None) for n, c in self.containers.items()}

    def tails(self) -> str:
        return "\n".join(c.tail() for c in self.containers.values())

    def kill_all(self) -> None:
        for c in self.containers.values():
            if c.proc is not None and c.proc.poll() is None:
                os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()


def _tree(folder: Path) -> dict[str, bytes]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_compose_services_run_as_local_processes_and_finish_the_run(tmp_path):
    compose = load_compose()
    image = read_image()
    cfg = yaml.safe_load((ROOT / "configs" / "compose.yaml").read_text())
    rounds = cfg["run"]["rounds"]
    emu = ComposeEmulator(compose, image, tmp_path)
    coord = emu.containers["coordinator"]
    run_dir = Path(option(coord.argv, "--run-dir"))
    metrics = run_dir / "metrics.jsonl"
    assert run_dir.is_relative_to(tmp_path / "volumes")

    t0 = time.monotonic()
    try:
        # `docker compose up`: the data jobs, the coordinator once they are done, its health
        # check, the silos once it is healthy; all of them to the end of the run.
        jobs = [emu.containers[n] for n in emu.one_shot()]
        emu.run_until(lambda: all(j.proc and j.proc.poll() is not None for j in jobs), 240)
        data = {v: _tree(emu.volumes / v) for v in compose["volumes"] if v.endswith("-data")}
        emu.run_until(lambda: False, timeout=180)
        codes = emu.exit_codes()
        assert coord.healthy and "SERVING" in coord.health_output, coord.health_output
        assert all(code == 0 for code in codes.values()), f"{codes}\n{emu.tails()}"
        finished = metrics.read_bytes()
        # `docker compose restart coordinator` after the end: the run folder on its volume
        # is resumed, not started over, and the coordinator exits 0 (so `on-failure` leaves
        # it down) without waiting for silos.
        emu.restart("coordinator")
        emu.run_until(lambda: False, timeout=120)
    finally:
        emu.kill_all()
    elapsed = time.monotonic() - t0
    assert coord.starts == 2 and coord.proc.returncode == 0, emu.tails()
    assert f"resuming run compose after committed round {rounds}" in coord.log.read_text()
    assert metrics.read_bytes() == finished
    records = read_jsonl(metrics)
    assert [r["round"] for r in records] == list(range(rounds + 1))
    assert all(r["status"] == "ok" and r["num_results"] == 3 for r in records[1:]), records
    assert records[-1]["global_accuracy"] > 0.2
    assert (run_dir / "final_model.safetensors").is_file()

    # Each silo's volume holds its own split and nothing else; the coordinator's only the
    # held-out test split. The read-only mounts were not written to during the run.
    domains = {"silo-1": "original", "silo-2": "inverted", "silo-3": "rotated"}
    for silo in cfg["silos"]:
        files = _tree(emu.volumes / f"{silo}-data")
        assert set(files) == {"data.safetensors", "meta.json"}
        meta = json.loads(files["meta.json"])
        assert meta["split"] == silo and meta["domain"] == domains[silo]
    files = _tree(emu.volumes / "coordinator-data")
    assert set(files) == {"test/data.safetensors", "test/meta.json"}
    assert json.loads(files["test/meta.json"])["split"] == "test"
    assert data == {v: _tree(emu.volumes / v) for v in data}
    # The data jobs' scratch (their tmpfs) is gone.
    assert not list((tmp_path / "containers").glob("*/tmpfs-*"))
    for silo in cfg["silos"]:
        assert f"silo={silo} run compose is over" in emu.containers[silo].log.read_text()
    print(f"compose emulation: {elapsed:.1f} s")
