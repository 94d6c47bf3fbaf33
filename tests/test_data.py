"""Tests for the split format (lssfl.dataprep.splits) and the embedded digits (.embedded)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lssfl.dataprep.embedded import (
    DOMAINS,
    MANIFEST_FILE,
    MIN_SILO_SAMPLES,
    PRETRAIN_COPIES,
    EmbeddedLayout,
    apply_domain,
    base_images,
    describe,
    materialize_embedded,
    shift_images,
)
from lssfl.dataprep.splits import (
    DATA_FILE,
    META_FILE,
    NUM_CLASSES,
    DataError,
    load_split,
    save_split,
)

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedLayout:
    """The default layout, generated once for the read-only tests."""
    return materialize_embedded(tmp_path_factory.mktemp("embedded"), num_silos=5, seed=0)


def _indices(folder: Path) -> list[int]:
    return json.loads((folder / META_FILE).read_text())["indices"]


def _all_dirs(lay: EmbeddedLayout) -> list[Path]:
    return [*lay.silo_dirs.values(), lay.test_dir, lay.pretrain_dir]


# --------------------------------------------------------------------------- embedded layout


def test_layout_shapes_dtypes_ranges(layout: EmbeddedLayout) -> None:
    assert list(layout.silo_dirs) == [f"silo-{i}" for i in range(1, 6)]
    assert (layout.root / MANIFEST_FILE).is_file()
    for folder in _all_dirs(layout):
        split = load_split(folder)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (3, 16, 16)
        assert split.num_samples == split.x.shape[0] > 0
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
        assert int(split.y.min()) >= 0 and int(split.y.max()) < NUM_CLASSES
        assert split.meta["class_counts"] == torch.bincount(split.y, minlength=10).tolist()
    for k, folder in enumerate(layout.silo_dirs.values()):
        meta = load_split(folder).meta
        assert meta["domain"] == DOMAINS[k % 5]
        assert load_split(folder).domain is None
    assert load_split(layout.pretrain_dir).meta["domain"] == "all"


def test_split_sizes_and_disjointness(layout: EmbeddedLayout) -> None:
    pre = _indices(layout.pretrain_dir)
    test = _indices(layout.test_dir)
    silos = [_indices(d) for d in layout.silo_dirs.values()]
    assert len(pre) == round(0.15 * NUM_DIGITS)
    assert len(test) == round(0.20 * NUM_DIGITS)
    sizes = [len(s) for s in silos]
    assert max(sizes) - min(sizes) <= 1  # natural split deals the pool out evenly
    everything = pre + test + [i for s in silos for i in s]
    assert len(everything) == len(set(everything)) == NUM_DIGITS  # disjoint and complete
    # The recorded indices must really be the digits stored in the files: the public split
    # starts with them as they are, and holds each in every domain, once more shifted.
    x_pre, y_pre = base_images(np.asarray(pre))
    split = load_split(layout.pretrain_dir)
    n = len(pre)
    assert split.num_samples == n * len(DOMAINS) * PRETRAIN_COPIES
    assert torch.equal(split.x[:n], x_pre) and torch.equal(split.y, y_pre.repeat(10))
    assert split.domain is not None
    assert split.domain.tolist() == [d for d in range(5) for _ in range(n * PRETRAIN_COPIES)]
    for d, name in enumerate(DOMAINS):  # the unshifted copy of each domain is the restyled digit
        block = split.x[d * PRETRAIN_COPIES * n : (d * PRETRAIN_COPIES + 1) * n]
        if name != "noisy":
            assert torch.equal(block, apply_domain(x_pre, name))
    assert load_split(layout.silo_dirs["silo-1"]).num_samples == sizes[0]


def test_test_split_covers_every_domain(layout: EmbeddedLayout) -> None:
    split = load_split(layout.test_dir)
    n = len(_indices(layout.test_dir))
    assert split.domain is not None and split.domain.dtype == torch.int64
    assert split.num_samples == n * len(DOMAINS)
    assert torch.bincount(split.domain).tolist() == [n] * len(DOMAINS)
    for d in range(len(DOMAINS)):  # the same digits, in the same order, in every domain
        assert torch.equal(split.y[split.domain == d], split.y[:n])


def test_domains_actually_differ(layout: EmbeddedLayout) -> None:
    split = load_split(layout.test_dir)
    assert split.domain is not None
    by = {name: split.x[split.domain == i] for i, name in enumerate(DOMAINS)}
    orig = by["original"]
    x_base, _ = base_images(np.asarray(_indices(layout.test_dir)))
    assert torch.equal(orig, x_base)
    assert torch.allclose(by["inverted"], 1.0 - orig)
    assert torch.equal(by["rotated"], torch.rot90(orig, 1, dims=(2, 3)))
    # Colored: channels no longer agree, and the background (blank in original) is bright.
    assert float((by["colored"][:, 0] - by["colored"][:, 2]).abs().mean()) > 0.2
    blank = orig.mean(dim=1) < 0.01
    assert float(by["colored"].mean(dim=1)[blank].mean()) > 0.5
    # Noisy: visibly perturbed, yet still the same digit underneath.
    diff = (by["noisy"] - orig).abs().mean()
    assert 0.05 < float(diff) < 0.5
    corr = np.corrcoef(by["noisy"].flatten().numpy(), orig.flatten().numpy())[0, 1]
    assert corr > 0.5
    for a in DOMAINS:
        for b in DOMAINS:
            if a < b:
                assert float((by[a] - by[b]).abs().mean()) > 0.05, (a, b)


def test_shift_images_moves_each_digit_by_at_most_one_pixel() -> None:
    x = torch.zeros(50, 3, 16, 16)
    x[:, :, 7, 7] = 1.0  # one lit pixel in the middle
    moved = shift_images(x, 1, seed=3)
    assert moved.shape == x.shape
    where = [tuple((img[0] == 1).nonzero()[0].tolist()) for img in moved]
    assert all(abs(r - 7) <= 1 and abs(c - 7) <= 1 for r, c in where)
    assert len(set(where)) > 3  # several different shifts were drawn
    assert torch.equal(moved, shift_images(x, 1, seed=3))
    assert float(moved.sum()) == float(x.sum())  # nothing falls off from the middle


def test_apply_domain_seeded_and_checked() -> None:
    x, _ = base_images(np.arange(8))
    assert torch.equal(apply_domain(x, "noisy", seed=3), apply_domain(x, "noisy", seed=3))
    assert not torch.equal(apply_domain(x, "noisy", seed=3), apply_domain(x, "noisy", seed=4))
    with pytest.raises(ValueError, match="unknown domain"):
        apply_domain(x, "sepia")


def test_same_seed_is_identical_different_seed_differs(tmp_path: Path) -> None:
    a = materialize_embedded(tmp_path / "a", num_silos=3, alpha=0.5, seed=7)
    b = materialize_embedded(tmp_path / "b", num_silos=3, alpha=0.5, seed=7)
    c = materialize_embedded(tmp_path / "c", num_silos=3, alpha=0.5, seed=8)
    for da, db in zip(_all_dirs(a), _all_dirs(b), strict=True):
        assert (da / DATA_FILE).read_bytes() == (db / DATA_FILE).read_bytes()
        assert (da / META_FILE).read_bytes() == (db / META_FILE).read_bytes()
    assert _indices(a.pretrain_dir) != _indices(c.pretrain_dir)
    assert _indices(a.silo_dirs["silo-1"]) != _indices(c.silo_dirs["silo-1"])
    assert not torch.equal(load_split(a.test_dir).y, load_split(c.test_dir).y)


def _skew(lay: EmbeddedLayout) -> float:
    """Mean over silos of the share of the silo's most common class."""
    shares = []
    for folder in lay.silo_dirs.values():
        counts = np.asarray(load_split(folder).meta["class_counts"])
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_dirichlet_skews_class_counts(tmp_path: Path, layout: EmbeddedLayout) -> None:
    skewed = materialize_embedded(tmp_path / "skew", num_silos=5, alpha=0.1, seed=0)
    assert _skew(layout) < 0.2  # natural split: near-balanced classes (~0.1)
    assert _skew(skewed) > 0.4
    present = [sum(c > 0 for c in load_split(d).meta["class_counts"]) for d in _all_dirs(skewed)]
    assert min(present[:5]) < NUM_CLASSES
    silos = [_indices(d) for d in skewed.silo_dirs.values()]
    flat = [i for s in silos for i in s]
    pool = sum(len(_indices(d)) for d in layout.silo_dirs.values())
    assert len(flat) == len(set(flat)) == pool  # skew reshuffles the same pool, disjointly
    assert set(flat).isdisjoint(_indices(skewed.test_dir) + _indices(skewed.pretrain_dir))


def test_dirichlet_keeps_every_silo_fed(tmp_path: Path) -> None:
    lay = materialize_embedded(tmp_path, num_silos=40, alpha=0.01, seed=1)
    sizes = [load_split(d).num_samples for d in lay.silo_dirs.values()]
    assert min(sizes) >= MIN_SILO_SAMPLES
    assert load_split(lay.silo_dirs["silo-40"]).meta["domain"] == DOMAINS[39 % 5]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_silos": 0},
        {"num_silos": 10_000},
        {"alpha": 0.0},
        {"alpha": float("nan")},
        {"seed": -1},
    ],
)
def test_materialize_rejects_bad_parameters(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        materialize_embedded(tmp_path, **kwargs)
    assert not (tmp_path / MANIFEST_FILE).exists()


def _mtimes(lay: EmbeddedLayout) -> dict[Path, int]:
    files = [lay.root / MANIFEST_FILE]
    files += [d / name for d in _all_dirs(lay) for name in (DATA_FILE, META_FILE)]
    return {f: f.stat().st_mtime_ns for f in files}


def test_cache_skips_rewrite_and_changes_rewrite(tmp_path: Path) -> None:
    first = materialize_embedded(tmp_path, num_silos=4, seed=0)
    before = _mtimes(first)
    again = materialize_embedded(tmp_path, num_silos=4, seed=0)
    assert again == first
    assert _mtimes(again) == before  # nothing was rewritten

    changed = materialize_embedded(tmp_path, num_silos=4, alpha=0.3, seed=0)
    after = _mtimes(changed)
    assert all(after[f] != before[f] for f in before)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["alpha"] == 0.3

    fewer = materialize_embedded(tmp_path, num_silos=2, seed=0)
    assert sorted(p.name for p in tmp_path.glob("silo-*")) == ["silo-1", "silo-2"]
    assert list(fewer.silo_dirs) == ["silo-1", "silo-2"]

    # A missing file defeats the cache even when the manifest matches.
    (fewer.test_dir / DATA_FILE).unlink()
    materialize_embedded(tmp_path, num_silos=2, seed=0)
    assert load_split(fewer.test_dir).num_samples > 0
    assert not list(tmp_path.rglob(".*tmp-*"))  # no temp files left behind


def test_describe_lists_every_split(layout: EmbeddedLayout) -> None:
    text = describe(layout.root)
    lines = text.splitlines()
    assert lines[0].split() == ["split", "domain", "samples", "classes"]
    for k, (name, folder) in enumerate(layout.silo_dirs.items()):
        row = next(line for line in lines if line.split()[0] == name).split()
        assert row[1] == DOMAINS[k % 5]
        assert int(row[2]) == load_split(folder).num_samples
        assert row[3] == "10/10"
    assert any(line.startswith("test") for line in lines)
    assert any(line.startswith("pretrain") for line in lines)


# --------------------------------------------------------------------------- split format


def _good() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 9])


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    x, y = _good()
    domain = torch.zeros(6, dtype=torch.int64)
    save_split(tmp_path / "s", x, y, {"domain": "original"}, domain=domain)
    split = load_split(tmp_path / "s")
    assert torch.equal(split.x, x) and torch.equal(split.y, y)
    assert split.domain is not None and torch.equal(split.domain, domain)
    assert split.meta["num_classes"] == 10 and split.meta["domain"] == "original"
    assert split.meta["class_counts"] == [1, 1, 1, 1, 1, 0, 0, 0, 0, 1]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [DATA_FILE, META_FILE]
    # The data file is a plain safetensors file, not a pickle.
    header_len = int.from_bytes((tmp_path / "s" / DATA_FILE).read_bytes()[:8], "little")
    header = json.loads((tmp_path / "s" / DATA_FILE).read_bytes()[8 : 8 + header_len])
    assert header["x"]["dtype"] == "F32" and header["y"]["dtype"] == "I64"


def test_meta_json_is_optional(tmp_path: Path) -> None:
    x, y = _good()
    tmp_path.joinpath("s").mkdir()
    save_file({"x": x, "y": y}, str(tmp_path / "s" / DATA_FILE))
    assert load_split(tmp_path / "s").num_classes == 10


def test_save_split_refuses_bad_data(tmp_path: Path) -> None:
    x, y = _good()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        save_split(tmp_path / "s", x, y)
    assert not (tmp_path / "s").exists()


def _write(folder: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / DATA_FILE))
    if meta is not None:
        (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def _with(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    x, y = _good()
    tensors = {"x": x, "y": y, **changes}
    return {k: v for k, v in tensors.items() if v is not None}


def _nan_x() -> torch.Tensor:
    x, _ = _good()
    x[2, 1, 3, 4] = float("nan")
    return x


def _inf_x() -> torch.Tensor:
    x, _ = _good()
    x[0, 0, 0, 0] = float("inf")
    return x


def _truncated(folder: Path) -> Path:
    _write(folder, _with())
    data = (folder / DATA_FILE).read_bytes()
    (folder / DATA_FILE).write_bytes(data[: len(data) // 2])
    return folder


def _garbage(folder: Path) -> Path:
    folder.mkdir()
    (folder / DATA_FILE).write_bytes(b"\x80\x04 this is a pickle, honest" * 4)
    return folder


def _not_a_folder(folder: Path) -> Path:
    folder.write_text("hello")
    return folder


def _no_data(folder: Path) -> Path:
    folder.mkdir()
    (folder / META_FILE).write_text("{}")
    return folder


BAD_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing folder": (lambda p: p, "split folder missing"),
    "not a folder": (_not_a_folder, "not a folder"),
    "data missing": (_no_data, "data.safetensors missing"),
    "truncated": (_truncated, "corrupt"),
    "garbage": (_garbage, "corrupt"),
    "no x": (lambda p: _write(p, _with(x=None)), "missing tensor 'x'"),
    "no y": (lambda p: _write(p, _with(y=None)), "missing tensor 'y'"),
    "wrong key": (
        lambda p: _write(p, {"images": _good()[0], "y": _good()[1]}),
        "missing tensor 'x'",
    ),
    "x float64": (lambda p: _write(p, _with(x=_good()[0].double())), "x has dtype"),
    "y int32": (lambda p: _write(p, _with(y=_good()[1].int())), "y has dtype"),
    "y float": (lambda p: _write(p, _with(y=_good()[1].float())), "y has dtype"),
    "x 3-D": (lambda p: _write(p, _with(x=torch.rand(6, 16, 16))), "x must be 4-D"),
    "y 2-D": (lambda p: _write(p, _with(y=torch.zeros(6, 1, dtype=torch.int64))), "y must be 1-D"),
    "lengths": (lambda p: _write(p, _with(y=torch.zeros(5, dtype=torch.int64))), "len(x)=6"),
    "negative label": (
        lambda p: _write(p, _with(y=torch.tensor([0, 1, -1, 3, 4, 5]))),
        "labels out of range",
    ),
    "label too big": (
        lambda p: _write(p, _with(y=torch.tensor([0, 1, 10, 3, 4, 5]))),
        "labels out of range",
    ),
    "label vs meta": (lambda p: _write(p, _with(), {"num_classes": 5}), "labels out of range"),
    "nan": (lambda p: _write(p, _with(x=_nan_x())), "non-finite"),
    "inf": (lambda p: _write(p, _with(x=_inf_x())), "non-finite"),
    "empty": (
        lambda p: _write(
            p, {"x": torch.zeros(0, 3, 16, 16), "y": torch.zeros(0, dtype=torch.int64)}
        ),
        "empty split",
    ),
    "bad domain": (
        lambda p: _write(p, _with(domain=torch.zeros(4, dtype=torch.int64))),
        "domain must be int64",
    ),
    "bad meta json": (lambda p: _write(p, _with()) and _bad_meta(p, "{not json"), "meta.json"),
    "meta not object": (lambda p: _write(p, _with()) and _bad_meta(p, "[1, 2]"), "JSON object"),
    "bad num_classes": (lambda p: _write(p, _with(), {"num_classes": "ten"}), "num_classes"),
}


def _bad_meta(folder: Path, text: str) -> Path:
    (folder / META_FILE).write_text(text)
    return folder


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_load_split_rejects(tmp_path: Path, case: str) -> None:
    make, expected = BAD_CASES[case]
    folder = make(tmp_path / "split")
    with pytest.raises(DataError) as info:
        load_split(folder)
    message = str(info.value)
    assert expected in message
    assert str(tmp_path / "split") in message  # names the path
    assert "\n" not in message  # one line, fit for a log
    assert isinstance(info.value, ValueError)


def test_silo_and_pretraining_domains_choose_the_regime(
    tmp_path: Path, layout: EmbeddedLayout
) -> None:
    """domains: what the silos hold (and the test split covers); pretrain_domains: what the
    start is trained on. The silos' digits are dealt as with the defaults."""
    label = materialize_embedded(tmp_path / "label", num_silos=3, domains=["original"], seed=0)
    for folder in label.silo_dirs.values():
        assert load_split(folder).meta["domain"] == "original"
    test, full_test = load_split(label.test_dir), load_split(layout.test_dir)
    assert test.num_samples * len(DOMAINS) == full_test.num_samples
    assert test.domain is not None and set(test.domain.tolist()) == {0}
    assert test.meta["domains"] == ["original"]

    partial = materialize_embedded(
        tmp_path / "partial", num_silos=5, pretrain_domains=("original", "rotated"), seed=0
    )
    pre, full_pre = load_split(partial.pretrain_dir), load_split(layout.pretrain_dir)
    assert pre.num_samples * len(DOMAINS) == full_pre.num_samples * 2
    assert pre.domain is not None and set(pre.domain.tolist()) == {0, 2}
    # The silos are as with every domain pre-trained: only the start changes.
    for name, folder in partial.silo_dirs.items():
        assert torch.equal(load_split(folder).x, load_split(layout.silo_dirs[name]).x)
    manifest = json.loads((tmp_path / "partial" / MANIFEST_FILE).read_text())
    assert manifest["pretrain_domains"] == ["original", "rotated"]
    # The default choice leaves the manifest as it was, so existing caches stay valid.
    assert "silo_domains" not in json.loads((layout.root / MANIFEST_FILE).read_text())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domains": ["sepia"]}, "data.domains: unknown domain 'sepia'"),
        ({"domains": []}, "data.domains must be a non-empty list"),
        ({"pretrain_domains": ["noisy", "noisy"]}, "data.pretrain_domains lists a domain twice"),
    ],
)
def test_bad_domains_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        materialize_embedded(tmp_path, num_silos=2, **kwargs)
    assert not (tmp_path / MANIFEST_FILE).exists()
