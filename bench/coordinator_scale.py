"""Coordinator memory and throughput against the number of silos: one round, N emulated silos.

For each N a coordinator process serves one round of a ResNet-18 (44.7 MB fp32) to N light
silos, spread over a few client processes: each silo joins, polls for its task, downloads
the model (read, not decoded) and streams back an upload encoded once per process; nobody
trains. The coordinator decodes every upload, keeps it on disk and aggregates from there.

Per N: the coordinator's peak RSS (VmHWM), the round's wall time (open to commit, as its
record says) and the round's traffic (down + up) per second of it. The targets: peak RSS at
N = 100 within 1.5x of N = 5, throughput at N = 100 at least half of N = 5.

    python bench/coordinator_scale.py --json                 # N = 5, 20, 50, 100
    python bench/coordinator_scale.py --silos 2,3 --model mlp --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch


def model_state(model: str) -> dict[str, torch.Tensor]:
    """The model every side agrees on (seeded)."""
    from lssfl.common.models import build_model

    torch.manual_seed(0)
    return build_model({"name": model}).state_dict()


def silo_ids(n: int) -> list[str]:
    """The silo ids of an N-silo round."""
    return [f"silo-{i:03d}" for i in range(n)]


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status")


def serve(n: int, model: str, out: Path) -> None:
    """Coordinator side: serve one round to ``n`` silos, then write figures to ``out``."""
    from lssfl.common.config import parse_config
    from lssfl.server.coordinator import Coordinator
    from lssfl.server.service import serve as serve_grpc
    from lssfl.server.store import RoundStore

    cfg = parse_config({
        "silos": silo_ids(n), "model": {"name": model, "init": "random"},
        "data": {"kind": "folders"},
        "coordinator": {"round_deadline_s": 3600, "join_timeout_s": 600, "min_silos": n},
    })  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(prefix="coordinator-scale-"))
    store = RoundStore(run_dir)
    c = Coordinator(cfg, store, model_state(model), lambda s: (0.0, 0.0), run_id="scale")
    server, port = serve_grpc(c, "127.0.0.1", 0)
    idle_mb = peak_rss_mb()
    (out.parent / f"{out.name}.port").write_text(str(port))
    c.wait_for_silos()
    c.run_round(1)
    record = store.records()[-1].to_dict()
    result = {"peak_rss_mb": peak_rss_mb(), "idle_rss_mb": idle_mb, "record": record}
    out.write_text(json.dumps(result))
    server.stop(0).wait()
    store.close()
    shutil.rmtree(run_dir)


def clients(port: int, silos: list[str], model: str) -> None:
    """Client side: ``silos`` as threads of this process; prints what each moved."""
    import grpc

    from lssfl.common.rpc import CHANNEL_OPTIONS, coordinator_stub
    from lssfl.common.security import SILO_HEADER
    from lssfl.common.wire import RawData, pack_state, stream_tensors, to_wire
    from lssfl.proto import coordinator_pb2 as cpb
    from lssfl.proto import tensor_pb2 as pb

    # Encoded once: every silo streams the same tensors after its own header.
    tail = [to_wire(m) for m in stream_tensors(pack_state(model_state(model)), pb.ModelChunk())]
    tail = tail[1:]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub = coordinator_stub(channel)
    moved: dict[str, dict[str, int]] = {}
    errors: list[str] = []

    def beat(silo_id: str, run_id: str, interval: float, done: threading.Event) -> None:
        # As a real silo does from its own thread: a silo queued for a download slot is alive,
        # and the coordinator closes a round early once every outstanding silo falls silent.
        md = ((SILO_HEADER, silo_id),)
        while not done.wait(interval):
            with contextlib.suppress(grpc.RpcError):
                stub.Heartbeat(
                    cpb.HeartbeatRequest(silo_id=silo_id, run_id=run_id), metadata=md, timeout=10
                )

    def silo(silo_id: str) -> None:
        md = ((SILO_HEADER, silo_id),)
        done = threading.Event()
        try:
            join = stub.Join(cpb.JoinRequest(silo_id=silo_id, num_samples=100), metadata=md)
            args = (silo_id, join.run_id, join.heartbeat_interval_s, done)
            threading.Thread(target=beat, args=args, daemon=True).start()
            while True:
                task = stub.GetTask(
                    cpb.TaskRequest(silo_id=silo_id, run_id=join.run_id), metadata=md, timeout=60
                )
                if task.kind == cpb.Task.TRAIN:
                    break
            down = 0
            request = cpb.DownloadRequest(silo_id=silo_id, run_id=join.run_id, round=task.round)
            for msg in stub.DownloadModel(request, metadata=md, timeout=3600):
                down += len(msg.data) if isinstance(msg, RawData) else 0
            header = pb.ModelChunk(
                upload=pb.UploadHeader(
                    run_id=join.run_id, round=task.round, silo_id=silo_id, num_samples=100
                )
            )
            reply = stub.UploadResult(iter([header, *tail]), metadata=md, timeout=3600)
            if not reply.accepted:
                errors.append(f"{silo_id}: {reply.message}")
            moved[silo_id] = {"down_payload": down}
        except grpc.RpcError as exc:
            errors.append(f"{silo_id}: {exc.code().name} {exc.details()}")
        finally:
            done.set()

    threads = [threading.Thread(target=silo, args=(s,)) for s in silos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    print(json.dumps({"moved": moved, "errors": errors}))


def one_round(n: int, model: str, processes: int) -> dict[str, Any]:
    """Run one N-silo round; returns its row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        script = str(Path(__file__).resolve())
        coordinator = subprocess.Popen(
            [sys.executable, script, "--serve", str(n), "--model", model, "--out", str(out)]
        )
        port_file = Path(f"{out}.port")
        while not port_file.exists():
            if coordinator.poll() is not None:
                raise RuntimeError(f"coordinator exited with {coordinator.returncode}")
            time.sleep(0.1)
        port = port_file.read_text()
        ids = silo_ids(n)
        groups = [ids[i::processes] for i in range(min(processes, n))]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    script,
                    "--clients",
                    ",".join(g),
                    "--port",
                    port,
                    "--model",
                    model,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for g in groups
        ]
        reports = [json.loads(p.communicate(timeout=3600)[0]) for p in procs]
        if coordinator.wait(timeout=600) != 0:
            raise RuntimeError(f"coordinator exited with {coordinator.returncode}")
        errors = [e for r in reports for e in r["errors"]]
        if errors:
            raise RuntimeError(f"{len(errors)} silos failed, first: {errors[0]}")
        result = json.loads(out.read_text())
    rec = result["record"]
    if rec["status"] != "ok" or rec["num_results"] != n:
        raise RuntimeError(f"round ended {rec['status']} with {rec['num_results']} of {n}")
    down_seen = sum(m["down_payload"] for r in reports for m in r["moved"].values())
    traffic = rec["bytes_down"] + rec["bytes_up"]
    return {
        "silos": n,
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
        "idle_rss_mb": round(result["idle_rss_mb"], 1),
        "round_seconds": rec["wall_seconds"],
        "mb_per_s": round(traffic / 1e6 / rec["wall_seconds"], 1),
        "bytes_down": rec["bytes_down"],
        "bytes_up": rec["bytes_up"],
        "bytes_down_payload": rec["bytes_down_payload"],
        "bytes_up_payload": rec["bytes_up_payload"],
        "bytes_down_payload_received": down_seen,
    }


def main() -> None:
    """Command line: the sweep, or one of its processes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--silos", default="5,20,50,100", help="comma-separated N to run")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--processes", type=int, default=4, help="client processes per round")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--clients", help=argparse.SUPPRESS)
    p.add_argument("--port", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve, args.model, args.out)
        return
    if args.clients is not None:
        clients(int(args.port), args.clients.split(","), args.model)
        return
    state = model_state(args.model)
    model_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    rows = []
    for n in (int(x) for x in args.silos.split(",")):
        rows.append(one_round(n, args.model, args.processes))
        if not args.json:
            print(json.dumps(rows[-1]), file=sys.stderr)
    out = {
        "model": args.model,
        "model_mb": round(model_mb, 2),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
