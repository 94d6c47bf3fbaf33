"""The embedded default dataset, which needs no network, written as split folders
(``lssfl.dataprep.splits``: the on-disk format, its validation, loading).

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
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lssfl.common.config import ConfigError, RunConfig

# The generator's names for the project's one seed derivation and one JSON writer.
from lssfl.common.seeding import seed_of as _derive_seed
from lssfl.dataprep.dirichlet import MIN_SILO_SAMPLES, dirichlet_split
from lssfl.dataprep.splits import (
    DATA_FILE,
    META_FILE,
    NUM_CLASSES,
    SILO_DIR_RE,
    remove_stale_silos,
    save_split,
)
from lssfl.dataprep.splits import write_json as _write_json

MANIFEST_FILE = "manifest.json"

IMAGE_SIZE = 16
CHANNELS = 3
DOMAINS: tuple[str, ...] = ("original", "inverted", "rotated", "colored", "noisy")

PRETRAIN_FRACTION = 0.15
TEST_FRACTION = 0.20
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


@dataclass(frozen=True)
class EmbeddedLayout:
    """Where :func:`materialize_embedded` put each split."""

    root: Path
    silo_dirs: dict[str, Path]
    test_dir: Path
    pretrain_dir: Path


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


def _partition_pool(
    pool: np.ndarray,
    labels: np.ndarray,
    num_silos: int,
    alpha: float | None,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Deal the (already shuffled) ``pool`` of digit indices out to silos, disjointly: in
    even parts, or with ``alpha`` each class in Dirichlet(alpha) shares over the silos
    (``lssfl.dataprep.dirichlet``, the same partitioner as ``lssfl partition``)."""
    if alpha is None:
        return [np.sort(part) for part in np.array_split(pool, num_silos)]
    return [np.sort(pool[part]) for part in dirichlet_split(labels[pool], num_silos, alpha, rng)]


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


def _manifest(
    num_silos: int,
    alpha: float | None,
    seed: int,
    domains: tuple[str, ...],
    pretrain_domains: tuple[str, ...],
) -> dict[str, Any]:
    # Only a non-default domain choice is recorded, so that caches written before the choice
    # existed stay valid.
    chosen = {
        **({"silo_domains": list(domains)} if domains != DOMAINS else {}),
        **({"pretrain_domains": list(pretrain_domains)} if pretrain_domains != DOMAINS else {}),
    }
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
        # Skewed layouts written before alpha meant per-class shares over silos are rewritten;
        # the natural layout (alpha None) keeps its cache.
        **({"skew": "dirichlet-per-class"} if alpha is not None else {}),
        **chosen,
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


def check_domains(what: str, domains: Any) -> tuple[str, ...]:
    """``domains`` as a tuple of known, distinct domain names, else ValueError naming ``what``."""
    if (
        not isinstance(domains, list | tuple)
        or not domains
        or not all(isinstance(d, str) for d in domains)
    ):
        raise ValueError(f"{what} must be a non-empty list of domains from {', '.join(DOMAINS)}")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"{what}: unknown domain {unknown[0]!r}; known: {', '.join(DOMAINS)}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"{what} lists a domain twice: {list(domains)}")
    return tuple(domains)


def check_data_section(cfg: RunConfig) -> None:
    """ConfigError (one line, ``SOURCE: data.KEY ...``) when ``data.domains`` or
    ``data.pretrain_domains`` is set for data that is not embedded or names unknown domains.

    ``load_config`` cannot check these (common does not import the data layer): whoever takes
    a run config for use calls this right after loading it.
    """
    for key in ("domains", "pretrain_domains"):
        value = getattr(cfg.data, key)
        if value is None:
            continue
        if cfg.data.kind != "embedded":
            raise ConfigError(f"{cfg.source}: data.{key} applies to data.kind 'embedded' only")
        try:
            check_domains(f"data.{key}", value)
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None


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
    domains: tuple[str, ...] | list[str] = DOMAINS,
    pretrain_domains: tuple[str, ...] | list[str] = DOMAINS,
) -> EmbeddedLayout:
    """Write the embedded digits dataset under ``root`` (cached by ``root/manifest.json``).

    Layout: ``root/silo-1 .. root/silo-N``, ``root/test``, ``root/pretrain``, each a split
    folder readable by :func:`load_split`. Silo ``silo-k`` gets domain
    ``domains[(k-1) % len(domains)]``; the public split is rendered in ``pretrain_domains``
    and the test split in every domain some silo holds. ``alpha`` (Dirichlet concentration)
    adds label skew across silos; ``None`` deals the pool out evenly. Same parameters ->
    identical bytes; a matching manifest skips writing.
    """
    if alpha is not None:
        alpha = float(alpha)
    _validate_params(num_silos, alpha, seed)
    domains = check_domains("data.domains", domains)
    pretrain_domains = check_domains("data.pretrain_domains", pretrain_domains)
    root = Path(root)
    layout = _layout(root, num_silos)
    expected = _manifest(num_silos, alpha, seed, domains, pretrain_domains)
    if _is_cached(layout, expected):
        return layout

    root.mkdir(parents=True, exist_ok=True)
    # Drop the manifest first: a rewrite interrupted halfway must not look like a cache hit.
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    remove_stale_silos(root, num_silos)
    pretrain, test, silos = _split_indices(num_silos, alpha, seed)
    common = {"source": GENERATOR_VERSION, "seed": seed, "num_classes": NUM_CLASSES}

    for k, (name, folder) in enumerate(layout.silo_dirs.items()):
        domain = domains[k % len(domains)]
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

    held = [d for d in DOMAINS if d in domains[:num_silos]]
    x, y = base_images(test)
    xs = [apply_domain(x, d, seed=_derive_seed(seed, "test", d)) for d in held]
    dom = torch.tensor([DOMAINS.index(d) for d in held]).repeat_interleave(len(test))
    meta = {
        **common,
        "split": "test",
        "domain": "all" if len(held) == len(DOMAINS) else "+".join(held),
        "domains": held,
        "indices": test.tolist(),
    }
    save_split(layout.test_dir, torch.cat(xs), y.repeat(len(held)), meta, domain=dom)

    x, y = base_images(pretrain)
    copies = [x] + [
        shift_images(x, MAX_SHIFT, _derive_seed(seed, "pretrain-shift", c))
        for c in range(1, PRETRAIN_COPIES)
    ]
    xs = [
        apply_domain(xc, d, seed=_derive_seed(seed, "pretrain", d, c))
        for d in pretrain_domains
        for c, xc in enumerate(copies)
    ]
    dom = torch.tensor([DOMAINS.index(d) for d in pretrain_domains])
    dom = dom.repeat_interleave(PRETRAIN_COPIES * len(pretrain))
    meta = {
        **common,
        "split": "pretrain",
        "domain": "all" if len(pretrain_domains) == len(DOMAINS) else "+".join(pretrain_domains),
        "domains": list(pretrain_domains),
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
        (p for p in root.iterdir() if p.is_dir() and SILO_DIR_RE.match(p.name)),
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
