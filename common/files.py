"""Atomic file writes: a reader or a crash sees the old file or the new one, never half.

Each write goes to a temporary name in the same folder (so that ``os.replace`` stays a rename
on one filesystem), unique per process and call (so that concurrent writers, e.g. several
silos materializing one data root, never clobber each other's temp file), is fsynced, renamed
over the target, and the folder is fsynced so that the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lssfl.common.faults import crash_point

if TYPE_CHECKING:  # torch is heavy; `lssfl partition --help` imports this module
    import torch


def _fsync_dir(path: Path) -> None:
    """Persist a rename; some filesystems cannot open directories, which is then harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_with(path: Path, write: Callable[[Path], None], crash_tag: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if crash_tag:
            crash_point(crash_tag)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, crash_tag: str = "") -> None:
    """Replace ``path`` with ``data``; ``crash_tag`` names a fault-injection point just
    before the rename (``lssfl.common.faults``)."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    _replace_with(path, write, crash_tag)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in UTF-8."""
    atomic_write(path, text.encode("utf-8"))


def atomic_save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Replace ``path`` with a safetensors file of ``tensors`` (and ``metadata``), written
    without a copy in memory."""
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    _replace_with(path, lambda tmp: save_file(contiguous, str(tmp), metadata), "")
