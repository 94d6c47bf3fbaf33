"""gRPC model download through the real service against a plain TCP socket, same bytes.

Child processes serve a ResNet-18 state dict (44.7 MB fp32) three ways: as the coordinator
service (DownloadModel of an open round), as a bare Python gRPC stream of the same
pre-serialized messages, and as a plain socket sending the same tensor bytes. This process
receives each and rebuilds the tensors ("tensors in, tensors out"), interleaving the three
so they share the machine's load, and prints JSON with the medians.

``ratio`` is grpc_s / socket_s. The socket reads into one newly mapped buffer, the way a
receiver that allocates per transfer does; it is mapped explicitly because a bytearray
sometimes got pages glibc had kept from the previous transfer, which made the baseline
12 ms in one run and 40 ms in the next. The decoder allocates new tensors through torch,
which usually also means new pages (about 10k faults for 44.8 MB) and sometimes reused
ones: ``page_faults`` shows which happened. Two more figures bound what is ours:
``grpc_bare_s`` is the same stream read without decoding (the cost of Python gRPC itself)
and ``socket_warm_s`` the socket reading into tensors whose pages are already mapped (the
floor of any receiver here).

    python bench/transport.py --json
"""

from __future__ import annotations

import argparse
import json
import mmap
import resource
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
    c.wait_for_silos()  # the round opens for the benchmark client once it has joined
    threading.Thread(target=c.run_round, args=(1,), daemon=True).start()
    server.wait_for_termination()


def serve_bare(model: str, port_file: Path) -> None:
    from concurrent import futures

    import grpc

    from lssfl.common.rpc import GRPC_OPTIONS
    from lssfl.common.wire import pack_state, stream_tensors, to_wire
    from lssfl.proto import tensor_pb2 as pb

    header = pb.ModelChunk(download=pb.DownloadHeader(round=1))
    messages = [to_wire(m) for m in stream_tensors(pack_state(state_dict(model)), header)]
    handler = grpc.method_handlers_generic_handler("bench.Bare", {
        "Download": grpc.unary_stream_rpc_method_handler(
            lambda request, context: iter(messages),
            request_deserializer=bytes, response_serializer=bytes,
        ),
    })  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(json.dumps({"port": port}))
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


def fetch_grpc(port: int, like: dict[str, torch.Tensor]) -> float:
    import grpc

    from lssfl.common.rpc import CHANNEL_OPTIONS, coordinator_stub
    from lssfl.common.wire import decode_model
    from lssfl.proto import coordinator_pb2 as cpb

    # The silo daemon's channel options.
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = coordinator_stub(channel)
        stub.Join(cpb.JoinRequest(silo_id="bench", num_samples=1), timeout=10)
        while stub.GetTask(cpb.TaskRequest(silo_id="bench"), timeout=10).kind != cpb.Task.TRAIN:
            pass
        t0 = time.perf_counter()
        stream = stub.DownloadModel(cpb.DownloadRequest(silo_id="bench", round=1), timeout=60)
        decoded = decode_model(stream, header_kind="download", max_payload_bytes=1 << 34)
        elapsed = time.perf_counter() - t0
    assert all(torch.equal(decoded.state[k], like[k]) for k in like)
    return elapsed


def fetch_bare(port: int, like: dict[str, torch.Tensor]) -> float:
    import grpc

    from lssfl.common.rpc import CHANNEL_OPTIONS

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        download = channel.unary_stream("/bench.Bare/Download", bytes, bytes)
        t0 = time.perf_counter()
        received = sum(len(m) for m in download(b"", timeout=60))
        elapsed = time.perf_counter() - t0
    assert received > sum(t.numel() * t.element_size() for t in like.values())
    return elapsed


def _recv_exactly(conn: socket.socket, view: memoryview) -> None:
    filled = 0
    while filled < len(view):
        n = conn.recv_into(view[filled:])
        if n == 0:
            raise ConnectionError("socket closed early")
        filled += n


def fetch_socket(port: int, like: dict[str, torch.Tensor]) -> float:
    """Into one freshly mapped buffer; the tensors are views of it."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        t0 = time.perf_counter()
        (total,) = struct.unpack("<Q", conn.recv(8, socket.MSG_WAITALL))
        buf = mmap.mmap(-1, total)
        _recv_exactly(conn, memoryview(buf))
        offset, out = 0, {}
        for name, t in like.items():
            out[name] = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=offset)
            offset += t.numel() * t.element_size()
        elapsed = time.perf_counter() - t0
    assert offset == total and all(torch.equal(out[k].view(like[k].shape), like[k]) for k in like)
    return elapsed


def fetch_socket_warm(
    port: int, like: dict[str, torch.Tensor], into: dict[str, torch.Tensor]
) -> float:
    """Straight into existing tensors whose pages are mapped already."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        t0 = time.perf_counter()
        conn.recv(8, socket.MSG_WAITALL)
        for t in into.values():
            _recv_exactly(conn, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elapsed = time.perf_counter() - t0
    assert all(torch.equal(into[k], like[k]) for k in like)
    return elapsed


def _ready(port_file: Path, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise SystemExit(f"server exited with {proc.returncode}")
    return port_file.exists() and bool(port_file.read_text())


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


SERVERS = {"grpc": serve_grpc, "bare": serve_bare, "socket": serve_socket}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](args.model, args.port_file)
        return

    like = state_dict(args.model)
    mb = sum(t.numel() * t.element_size() for t in like.values()) / 1e6
    warm = {k: torch.zeros_like(t) for k, t in like.items()}
    ports, procs = {}, []
    try:
        for mode in SERVERS:
            port_file = Path(tempfile.mkdtemp()) / "port"
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--serve", mode, "--model", args.model,
                 "--port-file", str(port_file)]
            ))  # fmt: skip
            while not _ready(port_file, procs[-1]):
                time.sleep(0.05)
            ports[mode] = json.loads(port_file.read_text())["port"]
        fetches = {
            "grpc": lambda: fetch_grpc(ports["grpc"], like),
            "grpc_bare": lambda: fetch_bare(ports["bare"], like),
            "socket": lambda: fetch_socket(ports["socket"], like),
            "socket_warm": lambda: fetch_socket_warm(ports["socket"], like, warm),
        }
        times: dict[str, list[float]] = {k: [] for k in fetches}
        faults: dict[str, list[int]] = {k: [] for k in fetches}
        order = list(fetches)
        for i in range(args.repeats + 1):  # the first round warms up and is dropped
            for name in order[i % len(order) :] + order[: i % len(order)]:  # rotated
                before = _faults()
                times[name].append(fetches[name]())
                faults[name].append(_faults() - before)
    finally:
        for proc in procs:
            proc.kill()
    from lssfl.common.wire import pack_state, stream_tensors
    from lssfl.proto import tensor_pb2 as pb

    # What the coordinator does once per round before any silo downloads.
    t0 = time.perf_counter()
    list(stream_tensors(pack_state(like), pb.ModelChunk(download=pb.DownloadHeader(round=1))))
    encode_s = time.perf_counter() - t0
    s = {k: statistics.median(v[1:]) for k, v in times.items()}
    result = {
        "model": args.model,
        "mb": round(mb, 2),
        "grpc_s": round(s["grpc"], 4),
        "socket_s": round(s["socket"], 4),
        "ratio": round(s["grpc"] / s["socket"], 3),
        "grpc_MBps": round(mb / s["grpc"], 1),
        "socket_MBps": round(mb / s["socket"], 1),
        "grpc_bare_s": round(s["grpc_bare"], 4),
        "socket_warm_s": round(s["socket_warm"], 4),
        "ratio_to_bare_grpc": round(s["grpc"] / s["grpc_bare"], 3),
        "ratio_to_warm_socket": round(s["grpc"] / s["socket_warm"], 3),
        "page_faults": {k: int(statistics.median(v[1:])) for k, v in faults.items()},
        "round_encode_s": round(encode_s, 4),
        "repeats": args.repeats,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
