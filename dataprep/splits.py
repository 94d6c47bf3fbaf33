"""Split folders: the on-disk format of silo data, written and read with validation.

One split folder ``DIR``:

* ``DIR/data.safetensors``: tensors ``x`` (float32, N x C x H x W; or uint8 pixels, a quarter
  of the size, which a silo reads per batch: ``lssfl.dataprep.silodata``) and ``y`` (int64, N);
  the multi-domain test split also carries ``domain`` (int64, N), the per-sample domain index.
* ``DIR/meta.json``: a JSON object, e.g. ``{"domain": "inverted", "num_classes": 10,
  "class_counts": [...]}``. ``num_classes`` bounds the labels (10 when absent).

Safetensors rather than pickle because silo data crosses trust boundaries: loading it must
never execute code. Both files are written atomically so a crash or a concurrent reader never
sees half a file. A data root holds one split folder per silo, ``silo-1`` .. ``silo-N``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lssfl.common.files import atomic_save_tensors, atomic_write
from lssfl.common.logs import one_line

DATA_FILE = "data.safetensors"
META_FILE = "meta.json"
NUM_CLASSES = 10
# Per-channel statistics the torchvision ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SILO_DIR_RE = re.compile(r"^silo-(\d+)$")


class DataError(ValueError):
    """Silo data that cannot be used; the message is one line naming the path and the problem."""


@dataclass(frozen=True)
class Split:
    """One split folder read back: images ``x`` (N x C x H x W float32), labels ``y`` (N int64).

    What a silo trains on and the coordinator tests on. Not
    :class:`lssfl.dataprep.datasets.LabelledData`, a source dataset before partitioning,
    which carries class and domain names where this carries the folder's ``meta.json``.
    """

    x: torch.Tensor
    y: torch.Tensor
    meta: dict[str, Any]
    # Per-sample domain index; only the multi-domain test split has one.
    domain: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        """Number of samples in the split."""
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        """Label space size from the metadata (labels are checked against it on load)."""
        return int(self.meta.get("num_classes", NUM_CLASSES))


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Replace ``path`` with ``obj`` as indented JSON with sorted keys."""
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- validation


def _check_tensors(
    where: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, domain: torch.Tensor | None
) -> None:
    """Raise DataError if ``x``/``y``/``domain`` are not a usable split."""
    if x.dtype not in (torch.float32, torch.uint8):
        raise DataError(f"{where}: x has dtype {x.dtype}, expected torch.float32 or torch.uint8")
    if y.dtype != torch.int64:
        raise DataError(f"{where}: y has dtype {y.dtype}, expected torch.int64")
    if x.dim() != 4:
        raise DataError(f"{where}: x must be 4-D (N x C x H x W), got shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise DataError(f"{where}: y must be 1-D, got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: len(x)={x.shape[0]} != len(y)={y.shape[0]}")
    if y.shape[0] == 0:
        raise DataError(f"{where}: empty split (0 samples)")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{where}: x has {bad} non-finite values (NaN/inf)")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{where}: labels out of range [0, {num_classes}): min {lo}, max {hi}")
    if domain is not None and (
        domain.dtype != torch.int64 or domain.dim() != 1 or domain.shape[0] != y.shape[0]
    ):
        raise DataError(
            f"{where}: domain must be int64 of shape ({y.shape[0]},), "
            f"got {domain.dtype} {tuple(domain.shape)}"
        )


def _num_classes_from_meta(where: str, meta: dict[str, Any]) -> int:
    n = meta.get("num_classes", NUM_CLASSES)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"{where}: num_classes must be a positive integer, got {n!r}")
    return n


# --------------------------------------------------------------------------- split I/O


def save_split(
    directory: str | os.PathLike[str],
    x: torch.Tensor,
    y: torch.Tensor,
    meta: dict[str, Any] | None = None,
    domain: torch.Tensor | None = None,
) -> Path:
    """Validate and write one split folder; fills in ``num_classes`` and ``class_counts``.

    Refuses (DataError) to write anything :func:`load_split` would reject, so bad data is
    caught where it is made rather than on a silo later.
    """
    path = Path(directory)
    meta = dict(meta or {})
    num_classes = _num_classes_from_meta(str(path), meta)
    x = x.detach().cpu()
    y = y.detach().cpu()
    domain = None if domain is None else domain.detach().cpu()
    _check_tensors(str(path), x, y, num_classes, domain)
    meta["num_classes"] = num_classes
    meta["class_counts"] = torch.bincount(y, minlength=num_classes).tolist()
    meta["num_samples"] = int(y.shape[0])
    meta["shape"] = list(x.shape[1:])
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"x": x, "y": y}
    if domain is not None:
        tensors["domain"] = domain
    atomic_save_tensors(path / DATA_FILE, tensors)
    write_json(path / META_FILE, meta)
    return path


def _load_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: unreadable meta.json: {one_line(exc)}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: meta.json must hold a JSON object")
    return meta


def load_split(directory: str | os.PathLike[str]) -> Split:
    """Load and validate one split folder; every problem raises :class:`DataError`."""
    path = Path(directory)
    if not path.exists():
        raise DataError(f"{path}: split folder missing")
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    data_path = path / DATA_FILE
    if not data_path.is_file():
        raise DataError(f"{path}: {DATA_FILE} missing")
    meta = _load_meta(path)
    num_classes = _num_classes_from_meta(str(path / META_FILE), meta)
    try:
        tensors = load_file(str(data_path))
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise DataError(f"{data_path}: unreadable or corrupt: {one_line(exc)}") from None
    for key in ("x", "y"):
        if key not in tensors:
            have = ", ".join(sorted(tensors)) or "none"
            raise DataError(f"{data_path}: missing tensor {key!r} (has: {have})")
    x, y, domain = tensors["x"], tensors["y"], tensors.get("domain")
    _check_tensors(str(data_path), x, y, num_classes, domain)
    if x.dtype == torch.uint8:  # whole, for the coordinator's test split; silos read per batch
        x = pixels_to_float(x, meta.get("normalize"))
    return Split(x=x, y=y, meta=meta, domain=domain)


def pixels_to_float(x: torch.Tensor, normalize: str | None) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1], normalised with the ImageNet mean/std if asked."""
    out = x.float().div_(255.0)
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out = out.sub_(mean).div_(std)
    return out


def remove_own_split(folder: Path) -> None:
    """Delete ``folder`` if it is a split folder holding nothing but what we write."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {DATA_FILE, META_FILE}:
        shutil.rmtree(folder)


def remove_stale_silos(root: Path, num_silos: int) -> None:
    """Drop silo folders left by an earlier, larger layout, but only ones that we wrote."""
    for child in root.iterdir():
        m = SILO_DIR_RE.match(child.name)
        if m and int(m.group(1)) > num_silos:
            remove_own_split(child)
