"""Silo data on disk, and the embedded default dataset that needs no network.

On-disk format of one split folder ``DIR``:

* ``DIR/data.safetensors``: tensors ``x`` (float32, N x C x H x W) and ``y`` (int64, N);
  the multi-domain test split also carries ``domain`` (int64, N), the per-sample domain index.
* ``DIR/meta.json``: a JSON object, e.g. ``{"domain": "inverted", "num_classes": 10,
  "class_counts": [...]}``. ``num_classes`` bounds the labels (10 when absent).

Safetensors rather than pickle because silo data crosses trust boundaries: loading it must
never execute code. Both files are written atomically so a crash or a concurrent reader never
sees half a file.

The embedded dataset is the real UCI handwritten digits bundled with scikit-learn, upsampled
to 3x16x16 and restyled into five domains (a feature shift), split once into a public
pre-training part, a held-out test part, and a pool dealt out to the silos, silo ``k``
(0-based) getting domain ``DOMAINS[k % 5]``. The public part is rendered in every domain, each
digit also once shifted by up to a pixel (light augmentation), so that a model pre-trained on
it is a generalist, as ImageNet weights are for the paper's silos; the test part is rendered
in every domain too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DATA_FILE = "data.safetensors"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"

NUM_CLASSES = 10
IMAGE_SIZE = 16
CHANNELS = 3
DOMAINS: tuple[str, ...] = ("original", "inverted", "rotated", "colored", "noisy")

PRETRAIN_FRACTION = 0.15
TEST_FRACTION = 0.20
# Floor on a silo's size under heavy label skew, so that no silo trains on (almost) nothing.
MIN_SILO_SAMPLES = 10
NOISE_STD = 0.35
# Colours of the "colored" domain: a warm background with a dark blue stroke, so that the
# channels no longer share one intensity and the background is bright instead of black.
COLOR_BACKGROUND = (0.95, 0.75, 0.20)
COLOR_FOREGROUND = (0.10, 0.15, 0.55)

# Bump when the generated content changes, so that old caches are rewritten.
GENERATOR_VERSION = "sklearn-digits/2"
# Copies of each public digit per domain: as is, and shifted by up to one pixel.
PRETRAIN_COPIES = 2
MAX_SHIFT = 1

_SILO_DIR_RE = re.compile(r"^silo-(\d+)$")


class DataError(ValueError):
    """Silo data that cannot be used; the message is one line naming the path and the problem."""


@dataclass(frozen=True)
class Split:
    """One loaded split: images ``x`` (N x C x H x W float32), labels ``y`` (N int64)."""

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


@dataclass(frozen=True)
class EmbeddedLayout:
    """Where :func:`materialize_embedded` put each split."""

    root: Path
    silo_dirs: dict[str, Path]
    test_dir: Path
    pretrain_dir: Path


# --------------------------------------------------------------------------- atomic writes


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


def _tmp_name(path: Path) -> Path:
    # Same folder so os.replace stays a rename on one filesystem; unique so concurrent
    # writers (several silos materializing one root) never clobber each other's temp file.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = _tmp_name(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- validation


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_tensors(
    where: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, domain: torch.Tensor | None
) -> None:
    """Raise DataError if ``x``/``y``/``domain`` are not a usable split."""
    if x.dtype != torch.float32:
        raise DataError(f"{where}: x has dtype {x.dtype}, expected torch.float32")
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
    if not bool(torch.isfinite(x).all()):
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
    _atomic_save_tensors(path / DATA_FILE, tensors)
    _write_json(path / META_FILE, meta)
    return path


def _load_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: unreadable meta.json: {_one_line(exc)}") from None
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
        raise DataError(f"{data_path}: unreadable or corrupt: {_one_line(exc)}") from None
    for key in ("x", "y"):
        if key not in tensors:
            have = ", ".join(sorted(tensors)) or "none"
            raise DataError(f"{data_path}: missing tensor {key!r} (has: {have})")
    x, y, domain = tensors["x"], tensors["y"], tensors.get("domain")
    _check_tensors(str(data_path), x, y, num_classes, domain)
    return Split(x=x, y=y, meta=meta, domain=domain)


# --------------------------------------------------------------------------- embedded digits


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 sklearn digits as (N x 8 x 8 float32 in [0,1], N int64); read once."""
    from sklearn.datasets import load_digits  # heavy import, only needed here

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def base_images(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits ``indices`` as 3 x 16 x 16 images in [0,1] (original domain) and their labels."""
    images, labels = _digits()
    x = torch.from_numpy(images[indices].copy()).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).expand(-1, CHANNELS, -1, -1).contiguous()
    return x, torch.from_numpy(labels[indices].copy())


def _derive_seed(*parts: object) -> int:
    # Stable across processes and Python versions, unlike hash().
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def apply_domain(x: torch.Tensor, domain: str, seed: int = 0) -> torch.Tensor:
    """Restyle original-domain images ``x`` (N x 3 x H x W, [0,1]) into ``domain``.

    Deterministic for a given ``seed`` (only "noisy" uses it). Output stays in [0,1].
    """
    if domain == "original":
        return x.clone()
    if domain == "inverted":
        return 1.0 - x
    if domain == "rotated":
        return torch.rot90(x, k=1, dims=(2, 3)).contiguous()
    if domain == "colored":
        ink = x.mean(dim=1, keepdim=True)
        bg = torch.tensor(COLOR_BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1)
        fg = torch.tensor(COLOR_FOREGROUND, dtype=x.dtype).view(1, 3, 1, 1)
        return bg * (1.0 - ink) + fg * ink
    if domain == "noisy":
        gen = torch.Generator().manual_seed(_derive_seed("noise", seed))
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype) * NOISE_STD
        return (x + noise).clamp(0.0, 1.0)
    raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")


def shift_images(x: torch.Tensor, max_shift: int, seed: int) -> torch.Tensor:
    """Each image moved by a random whole number of pixels in [-max_shift, max_shift] per axis.

    What leaves the frame is dropped and what enters is 0 (the digits' background).
    """
    gen = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=gen)
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    h, w = x.shape[2:]
    return torch.stack(
        [
            padded[i, :, p - dy : p - dy + h, p - dx : p - dx + w]
            for i, (dy, dx) in enumerate(shifts.tolist())
        ]
    )


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` as close as possible to ``weights`` shares."""
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(share - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _partition_pool(
    pool: np.ndarray,
    labels: np.ndarray,
    num_silos: int,
    alpha: float | None,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Deal the (already shuffled) ``pool`` of digit indices out to silos, disjointly."""
    if alpha is None:
        return [np.sort(part) for part in np.array_split(pool, num_silos)]
    # Silo i's class proportions p_i ~ Dir(alpha); each class's pool samples are dealt to the
    # silos in proportion to p_i[c], so a silo's class mix follows its p_i (classes are
    # near-balanced in the digits) while every sample is used exactly once.
    props = rng.dirichlet(np.full(NUM_CLASSES, alpha), size=num_silos)
    props = np.nan_to_num(props, nan=0.0) + 1e-12  # tiny alphas can underflow to all-zero
    parts: list[list[int]] = [[] for _ in range(num_silos)]
    pool_labels = labels[pool]
    for c in range(NUM_CLASSES):
        members = pool[pool_labels == c]
        counts = largest_remainder(props[:, c], len(members))
        for silo, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            parts[silo].extend(chunk.tolist())
    # Top up starved silos from the largest one so every silo can still train.
    for silo in range(num_silos):
        while len(parts[silo]) < MIN_SILO_SAMPLES:
            donor = max(range(num_silos), key=lambda s: len(parts[s]))
            take = int(rng.integers(len(parts[donor])))
            parts[silo].append(parts[donor].pop(take))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _split_indices(
    num_silos: int, alpha: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """One seeded permutation cut into (pretrain, test, per-silo) digit indices."""
    _, labels = _digits()
    n = len(labels)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_pre = round(PRETRAIN_FRACTION * n)
    n_test = round(TEST_FRACTION * n)
    pretrain = np.sort(perm[:n_pre])
    test = np.sort(perm[n_pre : n_pre + n_test])
    silos = _partition_pool(perm[n_pre + n_test :], labels, num_silos, alpha, rng)
    return pretrain, test, silos


def _pool_size() -> int:
    n = len(_digits()[1])
    return n - round(PRETRAIN_FRACTION * n) - round(TEST_FRACTION * n)


def _manifest(num_silos: int, alpha: float | None, seed: int) -> dict[str, Any]:
    return {
        "generator": GENERATOR_VERSION,
        "num_silos": num_silos,
        "alpha": alpha,
        "seed": seed,
        "domains": list(DOMAINS),
        "pretrain_fraction": PRETRAIN_FRACTION,
        "test_fraction": TEST_FRACTION,
        "image_size": IMAGE_SIZE,
        "noise_std": NOISE_STD,
        "pretrain_copies": PRETRAIN_COPIES,
        "max_shift": MAX_SHIFT,
    }


def _layout(root: Path, num_silos: int) -> EmbeddedLayout:
    return EmbeddedLayout(
        root=root,
        silo_dirs={f"silo-{i + 1}": root / f"silo-{i + 1}" for i in range(num_silos)},
        test_dir=root / "test",
        pretrain_dir=root / "pretrain",
    )


def _is_cached(layout: EmbeddedLayout, expected: dict[str, Any]) -> bool:
    try:
        found = json.loads((layout.root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    # Round-trip so that e.g. tuples and lists compare equal.
    if found != json.loads(json.dumps(expected)):
        return False
    dirs = [*layout.silo_dirs.values(), layout.test_dir, layout.pretrain_dir]
    return all((d / DATA_FILE).is_file() and (d / META_FILE).is_file() for d in dirs)


def remove_stale_silos(root: Path, num_silos: int) -> None:
    """Drop silo folders left by an earlier, larger layout, but only ones that we wrote."""
    ours = {DATA_FILE, META_FILE}
    for child in root.iterdir():
        m = _SILO_DIR_RE.match(child.name)
        if (
            m
            and int(m.group(1)) > num_silos
            and child.is_dir()
            and {p.name for p in child.iterdir()} <= ours
        ):
            shutil.rmtree(child)


def _validate_params(num_silos: int, alpha: float | None, seed: int) -> None:
    max_silos = _pool_size() // MIN_SILO_SAMPLES
    if not isinstance(num_silos, int) or not 1 <= num_silos <= max_silos:
        raise ValueError(f"num_silos must be an integer in [1, {max_silos}], got {num_silos!r}")
    if alpha is not None and not (
        isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0
    ):
        raise ValueError(f"alpha must be a positive number or None, got {alpha!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def materialize_embedded(
    root: str | os.PathLike[str],
    num_silos: int = 5,
    alpha: float | None = None,
    seed: int = 0,
) -> EmbeddedLayout:
    """Write the embedded digits dataset under ``root`` (cached by ``root/manifest.json``).

    Layout: ``root/silo-1 .. root/silo-N``, ``root/test``, ``root/pretrain``, each a split
    folder readable by :func:`load_split`. Silo ``silo-k`` gets domain ``DOMAINS[(k-1) % 5]``.
    ``alpha`` (Dirichlet concentration) adds label skew across silos; ``None`` deals the
    pool out evenly. Same parameters -> identical bytes; a matching manifest skips writing.
    """
    if alpha is not None:
        alpha = float(alpha)
    _validate_params(num_silos, alpha, seed)
    root = Path(root)
    layout = _layout(root, num_silos)
    expected = _manifest(num_silos, alpha, seed)
    if _is_cached(layout, expected):
        return layout

    root.mkdir(parents=True, exist_ok=True)
    # Drop the manifest first: a rewrite interrupted halfway must not look like a cache hit.
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    remove_stale_silos(root, num_silos)
    pretrain, test, silos = _split_indices(num_silos, alpha, seed)
    common = {"source": GENERATOR_VERSION, "seed": seed, "num_classes": NUM_CLASSES}

    for k, (name, folder) in enumerate(layout.silo_dirs.items()):
        domain = DOMAINS[k % len(DOMAINS)]
        x, y = base_images(silos[k])
        x = apply_domain(x, domain, seed=_derive_seed(seed, name))
        meta = {
            **common,
            "split": name,
            "domain": domain,
            "domain_index": DOMAINS.index(domain),
            "indices": silos[k].tolist(),
        }
        save_split(folder, x, y, meta)

    x, y = base_images(test)
    xs = [apply_domain(x, d, seed=_derive_seed(seed, "test", d)) for d in DOMAINS]
    dom = torch.arange(len(DOMAINS), dtype=torch.int64).repeat_interleave(len(test))
    meta = {
        **common,
        "split": "test",
        "domain": "all",
        "domains": list(DOMAINS),
        "indices": test.tolist(),
    }
    save_split(layout.test_dir, torch.cat(xs), y.repeat(len(DOMAINS)), meta, domain=dom)

    x, y = base_images(pretrain)
    copies = [x] + [
        shift_images(x, MAX_SHIFT, _derive_seed(seed, "pretrain-shift", c))
        for c in range(1, PRETRAIN_COPIES)
    ]
    xs = [
        apply_domain(xc, d, seed=_derive_seed(seed, "pretrain", d, c))
        for d in DOMAINS
        for c, xc in enumerate(copies)
    ]
    dom = torch.arange(len(DOMAINS)).repeat_interleave(PRETRAIN_COPIES * len(pretrain))
    meta = {
        **common,
        "split": "pretrain",
        "domain": "all",
        "domains": list(DOMAINS),
        "copies": PRETRAIN_COPIES,
        "indices": pretrain.tolist(),
    }
    n = len(xs)
    save_split(layout.pretrain_dir, torch.cat(xs), y.repeat(n), meta, domain=dom)

    _write_json(root / MANIFEST_FILE, expected)
    return layout


# --------------------------------------------------------------------------- reporting


def describe(root: str | os.PathLike[str]) -> str:
    """A per-split table (split, domain, samples, classes present) for logs.

    Reads only the small ``meta.json`` files, so it is cheap to call at start-up.
    """
    root = Path(root)
    if not root.is_dir():
        return f"{root}: no such data folder"
    silos = sorted(
        (p for p in root.iterdir() if p.is_dir() and _SILO_DIR_RE.match(p.name)),
        key=lambda p: int(p.name.split("-")[1]),
    )
    rows = [("split", "domain", "samples", "classes")]
    for folder in [*silos, root / "pretrain", root / "test"]:
        if not (folder / META_FILE).is_file():
            continue
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            rows.append((folder.name, "?", "?", "unreadable meta.json"))
            continue
        counts = meta.get("class_counts") or []
        present = [str(c) for c, n in enumerate(counts) if n > 0]
        classes = f"{len(present)}/{len(counts)}"
        if len(present) < len(counts):
            classes += f" ({','.join(present)})"
        samples = meta.get("num_samples", sum(counts))
        rows.append((folder.name, str(meta.get("domain", "?")), str(samples), classes))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    return "\n".join(lines)
