"""gRPC model download through the real service against a plain TCP socket, same bytes.

A child process serves a ResNet-18 state dict (44.7 MB fp32) twice: as the coordinator
service (DownloadModel of an open round) and as a bare socket that sends the same tensor
bytes. This process receives each and rebuilds the tensors ("tensors in, tensors out"),
times the median of several transfers, and prints JSON with grpc_s / socket_s.

    python bench/transport.py --json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def state_dict(model: str) -> dict[str, torch.Tensor]:
    from lssfl.common.models import build_model

    torch.manual_seed(0)
    return build_model({"name": model}).state_dict()


def serve_grpc(model: str, port_file: Path) -> None:
    from lssfl.common.config import parse_config
    from lssfl.server.coordinator import Coordinator
    from lssfl.server.service import serve
    from lssfl.server.store import RoundStore

    cfg = parse_config({
        "silos": ["bench"], "model": {"name": model, "init": "random"},
        "data": {"kind": "folders"}, "coordinator": {"round_deadline_s": 3600},
    })  # fmt: skip
    c = Coordinator(cfg, RoundStore(Path(tempfile.mkdtemp())), state_dict(model), lambda s: (0, 0))
    server, port = serve(c, "127.0.0.1", 0)
    port_file.write_text(json.dumps({"port": port}))
    while not c._silos:  # the round opens for the benchmark client once it has joined
        time.sleep(0.01)
    threading.Thread(target=c.run_round, args=(1,), daemon=True).start()
    server.wait_for_termination()


def serve_socket(model: str, port_file: Path) -> None:
    from lssfl.common.wire import pack_state

    state = state_dict(model)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port_file.write_text(json.dumps({"port": listener.getsockname()[1]}))
        while True:
            conn, _ = listener.accept()
            with conn:
                # Tensors in: the same zero-copy views the gRPC path starts from.
                tensors = pack_state(state)
                conn.sendall(struct.pack("<Q", sum(len(t.data) for t in tensors)))
                for t in tensors:
                    conn.sendall(t.data)


def fetch_grpc(port: int) -> float:
    import grpc

    from lssfl.common.rpc import coordinator_stub
    from lssfl.common.wire import MAX_MESSAGE_BYTES, decode_model
    from lssfl.proto import coordinator_pb2 as cpb

    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
        stub = coordinator_stub(channel)
        stub.Join(cpb.JoinRequest(silo_id="bench", num_samples=1), timeout=10)
        while stub.GetTask(cpb.TaskRequest(silo_id="bench"), timeout=10).kind != cpb.Task.TRAIN:
            pass
        t0 = time.perf_counter()
        stream = stub.DownloadModel(cpb.DownloadRequest(silo_id="bench", round=1), timeout=60)
        decoded = decode_model(stream, header_kind="download", max_payload_bytes=1 << 34)
        elapsed = time.perf_counter() - t0
    assert decoded.state
    return elapsed


def fetch_socket(port: int, like: dict[str, torch.Tensor]) -> float:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        t0 = time.perf_counter()
        (total,) = struct.unpack("<Q", conn.recv(8, socket.MSG_WAITALL))
        buf = bytearray(total)
        view, got = memoryview(buf), 0
        while got < total:
            n = conn.recv_into(view[got:], total - got)
            if n == 0:
                raise ConnectionError("socket closed early")
            got += n
        # Tensors out, as the gRPC path does.
        offset, out = 0, {}
        for name, t in like.items():
            nbytes = t.numel() * t.element_size()
            out[name] = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=offset)
            offset += nbytes
        elapsed = time.perf_counter() - t0
    assert offset == total
    return elapsed


def _ready(port_file: Path, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise SystemExit(f"server exited with {proc.returncode}")
    return port_file.exists() and bool(port_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", choices=["grpc", "socket"], help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        (serve_grpc if args.serve == "grpc" else serve_socket)(args.model, args.port_file)
        return

    like = state_dict(args.model)
    mb = sum(t.numel() * t.element_size() for t in like.values()) / 1e6
    times: dict[str, list[float]] = {"grpc": [], "socket": []}
    servers = {}
    try:
        for mode in ("grpc", "socket"):
            port_file = Path(tempfile.mkdtemp()) / "port"
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", mode, "--model", args.model,
                 "--port-file", str(port_file)]
            )  # fmt: skip
            while not _ready(port_file, proc):
                time.sleep(0.05)
            servers[mode] = (proc, json.loads(port_file.read_text()))
        # Interleaved, so both see the same machine load.
        for _ in range(args.repeats + 1):
            times["grpc"].append(fetch_grpc(servers["grpc"][1]["port"]))
            times["socket"].append(fetch_socket(servers["socket"][1]["port"], like))
    finally:
        for proc, _ in servers.values():
            proc.kill()
    from lssfl.common.wire import pack_state, stream_tensors
    from lssfl.proto import tensor_pb2 as pb

    # What the coordinator does once per round before any silo downloads.
    t0 = time.perf_counter()
    list(stream_tensors(pack_state(like), pb.ModelChunk(download=pb.DownloadHeader(round=1))))
    encode_s = time.perf_counter() - t0
    grpc_s = statistics.median(times["grpc"][1:])  # the first of each warms up
    socket_s = statistics.median(times["socket"][1:])
    result = {
        "model": args.model,
        "mb": round(mb, 2),
        "grpc_s": round(grpc_s, 4),
        "socket_s": round(socket_s, 4),
        "ratio": round(grpc_s / socket_s, 3),
        "grpc_MBps": round(mb / grpc_s, 1),
        "socket_MBps": round(mb / socket_s, 1),
        "round_encode_s": round(encode_s, 4),
        "repeats": args.repeats,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
