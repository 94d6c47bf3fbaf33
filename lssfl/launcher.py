"""``lssfl run``: coordinator and silos as separate OS processes on this machine."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from lssfl.common.config import RunConfig
from lssfl.common.plugins import is_import_path
from lssfl.common.records import RoundRecord
from lssfl.common.runfolder import ADDRESS_FILE, read_status
from lssfl.common.security import CA_CERT, add_silo, make_certs, silo_files
from lssfl.dataprep.dataroot import prepare_data_root
from lssfl.report import write_report
from lssfl.report.runs import read_metrics
from lssfl.report.tables import COLUMNS, format_line, row
from lssfl.status import open_round_progress, round_progress

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``docker stop``, a service manager): stop as Ctrl-C does."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def _die_with_launcher(launcher_pid: int) -> Callable[[], None]:
    """What a child runs before exec on Linux: SIGTERM when the launcher dies, even by
    SIGKILL, so that no coordinator or silo outlives it unattended."""

    # Looked up here, in the launcher: the child between fork and exec does as little as it can.
    prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None

    def arm() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher_pid:  # it died before the line above
            os._exit(128 + signal.SIGTERM)

    return arm


class _Proc:
    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "lssfl", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_launcher(os.getpid()),  # noqa: PLW1509 - one thread here
        )

    def tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def close(self) -> None:
        self._log.close()


class _RoundProgress:
    """Which silos have reported in the open round, from the store: redrawn on one line on a
    terminal, a line per change otherwise (a log or a pipe keeps every step)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.tty = sys.stdout.isatty()
        self._shown: str | None = None
        self._drawn = False  # a redrawn line is on screen, to erase before the next row

    def update(self) -> None:
        """Show the open round's count when it changed since the last look."""
        try:
            text = open_round_progress(read_status(self.run_dir))
        except ValueError:  # no state.db yet
            return
        if text is not None:
            self._show(text)

    def finish(self, record: RoundRecord) -> None:
        """Before a round's row: its final count, which a 0.2 s look may have missed (a
        line); the redrawn line is erased, the row says it."""
        if self.tty:
            if self._drawn:
                sys.stdout.write("\r\x1b[K")
                self._drawn = False
            return
        if record.round >= 1:
            reported = [s.silo_id for s in record.silos if s.status == "ok"]
            selected = len(reported) + len(record.missing)
            self._show(round_progress(record.round, selected, reported))

    def _show(self, text: str) -> None:
        if text == self._shown:
            return
        self._shown = text
        if self.tty:
            sys.stdout.write(f"\r{text}\x1b[K")
            self._drawn = True
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()


class _Rows:
    """Each committed round's row, once; and, for a round whose accuracy the silos measure
    when the next round starts (evaluation at the silos), a line when it arrives."""

    def __init__(self, progress: _RoundProgress) -> None:
        self.progress = progress
        self.printed = 0
        self.pending: set[int] = set()  # rounds shown with "-", silos' figures to come

    def show(self, records: list[RoundRecord]) -> None:
        """Print what ``records`` (all of metrics.jsonl) hold that was not printed yet."""
        for rec in records[: self.printed]:
            if rec.round in self.pending and rec.silo_accuracy is not None:
                self.pending.discard(rec.round)
                held_out = sum(e.num_samples for e in rec.evaluations)
                print(
                    f"round {rec.round}: silos measured accuracy={rec.silo_accuracy:.4f} "
                    f"loss={rec.silo_loss:.4f} on {held_out} held-out samples",
                    flush=True,
                )
        for rec in records[self.printed :]:
            self.progress.finish(rec)
            print(format_line(row(rec)), flush=True)
            if rec.evaluation != "coordinator" and rec.silo_accuracy is None:
                self.pending.add(rec.round)
        self.printed = len(records)


def _stop_all(procs: list[_Proc], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.popen.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()
        p.close()


def _security_args(cfg: RunConfig, silo: str) -> list[str]:
    sec = cfg.security
    folder = Path(sec.dir or ".")
    cert, key, token = silo_files(folder, silo)
    args = []
    if sec.tls:
        args += ["--ca", str(folder / CA_CERT)]
    if sec.mutual_tls:
        args += ["--cert", str(cert), "--key", str(key)]
    if sec.tokens:
        args += ["--token-file", str(token)]
    return args


def _plugin_args(cfg: RunConfig) -> list[str]:
    """The import paths of this config: the silos run what the operator's own config names."""
    names = (cfg.model.name, str(cfg.trainer.get("name")))
    return [arg for name in names if is_import_path(name) for arg in ("--allow-plugin", name)]


def new_run_dir(cfg: RunConfig) -> Path:
    """A fresh ``<out_dir>/<name>-<time>`` folder name for a run."""
    base = Path(cfg.run.out_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def launch(cfg: RunConfig, config_path: Path, run_dir: Path | None = None) -> int:
    """``lssfl run``: coordinator and silos as processes until the run ends; exit code
    (130 after Ctrl-C, 143 after SIGTERM, both of which stop every process first)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    run_dir = run_dir or new_run_dir(cfg)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data = prepare_data_root(cfg)  # once, before several processes would race to make it
    sec = cfg.security
    if sec.dir and not (Path(sec.dir) / CA_CERT).exists():
        make_certs(Path(sec.dir), cfg.silos, ["localhost", cfg.coordinator.host])
        print(f"made a demo CA, certificates and tokens in {sec.dir}", flush=True)
    elif sec.dir:
        for silo in cfg.silos:  # a silo added to the config gets its files, the others keep theirs
            if not silo_files(Path(sec.dir), silo)[0].exists():
                add_silo(Path(sec.dir), silo)
                print(f"added {silo}'s certificate and token to {sec.dir}", flush=True)
    env = dict(os.environ)
    # Several silos share this machine's cores: one thread each avoids oversubscription.
    silo_env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(cfg.silos)))}
    print(f"run folder: {run_dir}", flush=True)

    coord = _Proc(
        "coordinator",
        ["coordinator", "--config", str(config_path), "--run-dir", str(run_dir)],
        logs / "coordinator.log",
        env,
    )
    procs = [coord]
    reported: set[str] = set()
    try:
        address_file = run_dir / ADDRESS_FILE
        print("coordinator: preparing the initial model ...", flush=True)
        while not address_file.exists():
            if coord.popen.poll() is not None:
                print(f"coordinator exited early:\n{coord.tail()}", file=sys.stderr)
                return 1
            time.sleep(0.1)
        address = address_file.read_text().strip()
        print(f"coordinator: {address}; starting {len(cfg.silos)} silos", flush=True)
        for silo in cfg.silos:
            args = ["silo", "--coordinator", address, "--silo-id", silo]
            args += ["--data", str(data.silo_dirs[silo]), *_security_args(cfg, silo)]
            args += _plugin_args(cfg)
            procs.append(_Proc(silo, args, logs / f"{silo}.log", silo_env))

        print(format_line(COLUMNS), flush=True)
        rows = _Rows(_RoundProgress(run_dir))
        while True:
            rows.show(read_metrics(run_dir))
            rows.progress.update()
            for p in procs[1:]:
                code = p.popen.poll()
                if code not in (None, 0) and p.name not in reported:
                    reported.add(p.name)
                    print(f"{p.name} exited with code {code}:\n{p.tail()}", file=sys.stderr)
            if coord.popen.poll() is not None:
                break
            time.sleep(0.2)
        rows.show(read_metrics(run_dir))
        code = coord.popen.returncode
        if code != 0:
            print(f"coordinator exited with code {code}:\n{coord.tail()}", file=sys.stderr)
        end = time.monotonic() + 15
        for p in procs[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.1, end - time.monotonic()))
        # The coordinator writes the report when it ends; a crashed one leaves it to us.
        report = run_dir / "report.html" if code == 0 else write_report(run_dir)
        print(f"report: {report}\nmetrics: {run_dir / 'metrics.jsonl'}\nlogs: {logs}/")
        return code
    except KeyboardInterrupt as exc:
        print("\ninterrupted: stopping coordinator and silos", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        _stop_all(procs)
