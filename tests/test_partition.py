"""Tests for `lssfl partition` (lssfl.partition) on small datasets written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lssfl.dataprep.catalog import DATASETS
from lssfl.dataprep.dirichlet import MIN_SILO_SAMPLES, dirichlet_split
from lssfl.dataprep.splits import DATA_FILE, META_FILE, DataError, load_split
from lssfl.partition import (
    SUMMARY_FILE,
    format_summary,
    iid_split,
    parse_args,
    partition_dataset,
    run,
)
from tests.test_datasets import write_domain_folder, write_image_folder, write_mnist

N_TRAIN, N_TEST = 1000, 100


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, n_train=N_TRAIN, n_test=N_TEST)
    return root


@pytest.fixture(scope="module")
def digit_domains(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three domains x three classes, 10 images each: a tiny Digit-5 look-alike."""
    root = tmp_path_factory.mktemp("domains")
    classes = {"0": 10, "1": 10, "2": 10}
    write_domain_folder(root, {"mnist": classes, "svhn": classes, "usps": classes})
    return root


def cli(*argv: str) -> int:
    return run(parse_args(list(argv)))


def silo_indices(out: Path, n: int) -> list[list[int]]:
    return [load_split(out / f"silo-{k}").meta["indices"] for k in range(1, n + 1)]


def label_skew(out: Path, n: int) -> float:
    """Mean total-variation distance of each silo's label mix from the pooled mix."""
    counts = np.array([load_split(out / f"silo-{k}").meta["class_counts"] for k in range(1, n + 1)])
    pooled = counts.sum(0) / counts.sum()
    mixes = counts / counts.sum(1, keepdims=True)
    return float(np.abs(mixes - pooled).sum(1).mean() / 2)


# --------------------------------------------------------------------------- schemes


def test_iid_is_disjoint_covering_and_balanced(mnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli("--dataset", "mnist", "--root", str(mnist_root), "--out", str(out),
               "--silos", "4", "--scheme", "iid") == 0  # fmt: skip
    parts = silo_indices(out, 4)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(N_TRAIN))  # every train sample exactly once
    assert [len(p) for p in parts] == [250] * 4
    split = load_split(out / "silo-2")
    assert split.x.shape == (250, 1, 28, 28) and split.meta["split"] == "silo-2"
    test = load_split(out / "test")  # MNIST has its own test split, used as is
    assert test.num_samples == N_TEST and test.meta["source"] == "official"
    assert label_skew(out, 4) < 0.1


def test_dirichlet_skews_labels_more_than_iid(mnist_root: Path, tmp_path: Path) -> None:
    common = ["--dataset", "mnist", "--root", str(mnist_root), "--silos", "5"]
    cli(*common, "--out", str(tmp_path / "iid"), "--scheme", "iid")
    cli(*common, "--out", str(tmp_path / "dir"), "--alpha", "0.1")
    parts = silo_indices(tmp_path / "dir", 5)
    assert sorted(i for p in parts for i in p) == list(range(N_TRAIN))
    assert min(len(p) for p in parts) >= MIN_SILO_SAMPLES
    assert label_skew(tmp_path / "dir", 5) > 0.4 > 0.1 > label_skew(tmp_path / "iid", 5)


def test_tiny_alpha_still_feeds_every_silo() -> None:
    labels = np.repeat(np.arange(10), 30)
    for seed in range(3):
        parts = dirichlet_split(labels, 10, 0.001, np.random.default_rng(seed))
        assert min(len(p) for p in parts) >= MIN_SILO_SAMPLES
        assert sorted(np.concatenate(parts).tolist()) == list(range(300))


def test_split_functions_are_partitions() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=503)
    for parts in (iid_split(503, 6, rng), dirichlet_split(labels, 6, 0.5, rng)):
        assert sorted(np.concatenate(parts).tolist()) == list(range(503))
    with pytest.raises(ValueError, match="cannot fill"):
        iid_split(3, 4, rng)


def test_same_seed_same_bytes_other_seed_differs(mnist_root: Path, tmp_path: Path) -> None:
    common = ["--dataset", "mnist", "--root", str(mnist_root), "--silos", "3"]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        cli(*common, "--out", str(tmp_path / name), "--seed", seed)
    for split in ("silo-1", "silo-2", "silo-3", "test"):
        for f in (DATA_FILE, META_FILE):
            assert (tmp_path / "a" / split / f).read_bytes() == (
                tmp_path / "b" / split / f
            ).read_bytes()
    assert (tmp_path / "a" / SUMMARY_FILE).read_bytes() == (
        tmp_path / "b" / SUMMARY_FILE
    ).read_bytes()
    assert silo_indices(tmp_path / "a", 3) != silo_indices(tmp_path / "c", 3)


def test_domain_scheme_one_domain_per_silo(digit_domains: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = partition_dataset(
        "domainfolder", digit_domains, out, 3, scheme="domain", test_fraction=0.2, image_size=4
    )
    names = ["mnist", "svhn", "usps"]
    for k, name in enumerate(names, start=1):
        split = load_split(out / f"silo-{k}")
        assert split.meta["domain"] == name and split.meta["domain_index"] == k - 1
        assert split.meta["class_counts"] == [8, 8, 8]  # 2 of each class's 10 held out
        assert split.x.shape == (24, 3, 4, 4)
    test = load_split(out / "test")
    assert test.meta["source"] == "held-out" and test.meta["domains"] == names
    assert test.domain is not None and test.domain.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    held = set(test.meta["indices"])
    assert not held & {i for p in silo_indices(out, 3) for i in p}
    assert len(held) + sum(len(p) for p in silo_indices(out, 3)) == 90
    assert summary["domains"] == names and summary["test_fraction"] == 0.2


def test_domain_scheme_errors(digit_domains: Path, mnist_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"got 2, the data has 3 \(mnist, svhn, usps\)"):
        cli("--dataset", "domainfolder", "--root", str(digit_domains), "--out", str(tmp_path / "a"),
            "--silos", "2", "--scheme", "domain")  # fmt: skip
    assert not (tmp_path / "a").exists()  # refused before writing anything
    with pytest.raises(ValueError, match="needs a dataset with domains"):
        cli("--dataset", "mnist", "--root", str(mnist_root), "--out", str(tmp_path / "b"),
            "--silos", "3", "--scheme", "domain")  # fmt: skip


def test_image_folder_holds_out_stratified_test(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "xray", {"normal": 40, "pneumonia": 20})
    out = tmp_path / "out"
    cli("--dataset", "imagefolder", "--root", str(tmp_path / "xray"), "--out", str(out),
        "--silos", "2", "--scheme", "iid", "--test-fraction", "0.25")  # fmt: skip
    test = load_split(out / "test")
    assert test.meta["class_counts"] == [10, 5]  # 25% of each class
    assert test.meta["classes"] == ["normal", "pneumonia"]
    assert sum(load_split(out / f"silo-{k}").num_samples for k in (1, 2)) == 45


# --------------------------------------------------------------------------- summary, output


def test_summary_table_and_json(mnist_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    cli("--dataset", "mnist", "--root", str(mnist_root), "--out", str(out), "--silos", "3",
        "--alpha", "0.5", "--channels", "3", "--image-size", "8")  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["scheme"] == "dirichlet" and summary["alpha"] == 0.5 and summary["silos"] == 3
    assert summary["shape"] == [3, 8, 8] and summary["test_source"] == "official"
    assert [s["name"] for s in summary["splits"]] == ["silo-1", "silo-2", "silo-3", "test"]
    for rec in summary["splits"]:
        meta = load_split(out / rec["name"]).meta
        assert rec["class_counts"] == meta["class_counts"] and rec["samples"] == sum(
            meta["class_counts"]
        )
    lines = printed.splitlines()
    assert lines[0].split()[:3] == ["split", "samples", "0"] and lines[0].split()[-1] == "9"
    silo1 = summary["splits"][0]
    assert lines[1].split() == ["silo-1", str(silo1["samples"]), *map(str, silo1["class_counts"])]
    assert "classes: 0=0 - zero" in printed and "partition.json" in printed


def test_many_classes_print_a_count() -> None:
    summary = {"classes": [f"c{i}" for i in range(30)], "domains": []}
    summary["splits"] = [
        {"name": "silo-1", "domain": "x", "samples": 3, "class_counts": [1, 2] + [0] * 28}
    ]
    assert format_summary(summary).splitlines()[1].split() == ["silo-1", "3", "2/30"]


def test_rerun_with_fewer_silos_removes_stale_ones(mnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["--dataset", "mnist", "--root", str(mnist_root), "--out", str(out)]
    cli(*common, "--silos", "4")
    (out / "notes").mkdir()
    cli(*common, "--silos", "2", "--scheme", "iid")
    assert sorted(p.name for p in out.iterdir()) == [
        "notes",
        SUMMARY_FILE,
        "silo-1",
        "silo-2",
        "test",
    ]


# --------------------------------------------------------------------------- errors, CLI


def test_missing_root_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        cli("--dataset", "mnist", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
            "--silos", "2")  # fmt: skip
    with pytest.raises(DataError, match="not found"):
        cli("--dataset", "imagefolder", "--root", str(tmp_path / "none"),
            "--out", str(tmp_path / "o"), "--silos", "2")  # fmt: skip


@pytest.mark.parametrize("alpha", ["0", "-1", "nan", "inf"])
def test_bad_alpha(mnist_root: Path, tmp_path: Path, alpha: str) -> None:
    with pytest.raises(ValueError, match="--alpha must be a positive number"):
        cli("--dataset", "mnist", "--root", str(mnist_root), "--out", str(tmp_path / "o"),
            "--silos", "2", "--alpha", alpha)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_other_argument_errors(mnist_root: Path, tmp_path: Path) -> None:
    base = ["--dataset", "mnist", "--root", str(mnist_root), "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="test-fraction"):
        cli(*base, "--silos", "2", "--test-fraction", "1.5")
    with pytest.raises(ValueError, match="cannot fill"):
        cli(*base, "--silos", str(N_TRAIN + 1))
    with pytest.raises(ValueError, match="unknown dataset"):
        cli("--dataset", "imagenet", "--root", str(mnist_root), "--out", str(tmp_path / "o"),
            "--silos", "2")  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args([*base, "--silos", "0"])
    with pytest.raises(ValueError, match="outside the dataset root"):
        cli(*base[:4], "--out", str(mnist_root), "--silos", "2")


def test_help_has_example_and_every_dataset(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "lssfl partition --dataset cifar10" in text and "--scheme" in text
    # One list of names (lssfl.dataprep.catalog), read without torch.
    assert f"one of: {', '.join(DATASETS)}" in " ".join(text.split())
