"""Atomic writes (lssfl.common.files): old or new content, never half; unique temp names."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file

from lssfl.common.files import atomic_save_tensors, atomic_write, atomic_write_text


def test_writes_replace_and_leave_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    atomic_write_text(tmp_path / "b.txt", "é\n")
    atomic_save_tensors(tmp_path / "c.safetensors", {"w": torch.arange(6).view(2, 3).t()})
    assert path.read_bytes() == b"new"
    assert (tmp_path / "b.txt").read_bytes() == "é\n".encode()
    assert torch.equal(load_file(tmp_path / "c.safetensors")["w"], torch.arange(6).view(2, 3).t())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.safetensors"]


def test_concurrent_writers_never_clobber_each_other(tmp_path: Path) -> None:
    path = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write, args=(path, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads  # one whole write, not a mix
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_a_crash_before_the_rename_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    atomic_write(path, b"old")
    code = (
        "import sys; from pathlib import Path; from lssfl.common.files import atomic_write; "
        "atomic_write(Path(sys.argv[1]), b'new', crash_tag='here')"
    )
    env = {**os.environ, "LSSFL_CRASH_AT": "here"}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, timeout=60)
    assert proc.returncode == -9  # SIGKILL at the crash point
    assert path.read_bytes() == b"old"
