"""The meter against the kernel: bytes the coordinator's TCP socket sent and received."""

import re
import shutil
import subprocess

import pytest
import torch

from tests.test_service import Harness

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")


def _socket_counters(port: int) -> tuple[int, int]:
    """(bytes_acked, bytes_received) of the coordinator's side of its one connection."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    acked = [int(x) for x in re.findall(r"bytes_acked:(\d+)", out)]
    received = [int(x) for x in re.findall(r"bytes_received:(\d+)", out)]
    assert len(acked) == 1 and len(received) == 1, out
    return acked[0], received[0]


def test_meter_agrees_with_the_kernel_within_a_few_percent(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(2_000_000, generator=g), "b": torch.randn(1000, generator=g)}
    h = Harness(tmp_path, state, silos=("s1",))
    try:
        h.join("s1")
        h.open_round()
        got = h.download()
        assert h.upload(got.state).accepted
        h.thread.join(30)
        port = int(h.channel._channel.target().decode().rsplit(":", 1)[1])
        sent, received = _socket_counters(port)
    finally:
        h.close()
    down = sum(h.coordinator.meter.get(r, "s1", "down").bytes for r in (0, 1))
    up = sum(h.coordinator.meter.get(r, "s1", "up").bytes for r in (0, 1))
    assert down > 8_000_000 and up > 8_000_000
    # The kernel sees more: per message a 5-byte gRPC prefix, HTTP/2 frame headers
    # (9 bytes per frame of at most 16 KiB), HPACK headers per call, SETTINGS, PING and
    # WINDOW_UPDATE frames. For megabytes of payload that is well under 1 %.
    assert down <= sent <= 1.03 * down, (down, sent)
    assert up <= received <= 1.03 * up, (up, received)
