"""Tests for lssfl.dataprep.datasets: real on-disk formats, written small by the tests."""

from __future__ import annotations

import bz2
import os
import pickle  # only to write CIFAR-10's genuine on-disk format (pickled batches)
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lssfl.dataprep.catalog import DATASETS, canonical_name
from lssfl.dataprep.datasets import IMAGENET_MEAN, IMAGENET_STD, has_test_split, load_dataset
from lssfl.dataprep.splits import DataError

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# --------------------------------------------------------------------------- format writers


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (the MNIST format): 0, 0, dtype code 8 (uint8), ndim, big-endian dims."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(
    root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw idx files under ``root/folder/raw`` as torchvision expects; returns the arrays."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays["train" if prefix == "train" else "test"] = (images, labels)
    return arrays


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 8) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py``: five pickled train batches, a test batch and the meta."""
    rng = np.random.default_rng(1)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    out: dict[str, list[np.ndarray]] = {"x_train": [], "y_train": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        # One row per image: 1024 red, then 1024 green, then 1024 blue bytes, row-major.
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(base / name, "wb") as fh:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, fh)
        key = "test" if name == "test_batch" else "train"
        out.setdefault(f"x_{key}", []).append(data)
        out.setdefault(f"y_{key}", []).append(np.asarray(labels))
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_vis": 3072}, fh)
    return {k: np.concatenate(v) for k, v in out.items()}


def write_usps(root: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    """libsvm lines ``label i:v ...`` (labels 1..10, pixels in [-1,1]) in usps(.t).bz2."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, name, n in (("train", "usps.bz2", n_train), ("test", "usps.t.bz2", n_test)):
        # -1 and 1 map exactly to 0 and 255, so the test can compare bytes exactly.
        pixels = rng.choice(np.array([-1.0, 1.0]), size=(n, 256))
        labels = rng.integers(1, 11, size=n)
        lines = [
            f"{lab} " + " ".join(f"{i + 1}:{v:g}" for i, v in enumerate(row))
            for lab, row in zip(labels, pixels, strict=True)
        ]
        (root / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        out[split] = ((pixels + 1) / 2 * 255).astype(np.uint8), labels - 1
    return out


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_image_folder(root: Path, classes: dict[str, int], color_of=None) -> None:
    """``root/<class>/img-i.png``: ``classes[name]`` solid-colour images per class."""
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            color = color_of(c, i) if color_of else (10 * c, 20 + i, 200)
            write_png(root / name / f"img-{i}.png", color)


def write_domain_folder(root: Path, layout: dict[str, dict[str, int]]) -> None:
    """``root/<domain>/<class>/img-i.png`` with a brightness per domain."""
    for d, (domain, classes) in enumerate(layout.items()):
        write_image_folder(root / domain, classes, lambda c, i, d=d: (40 * d, 10 * c, i))


@pytest.fixture
def exact_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accept the test's own CIFAR-10/SVHN files, which cannot match the published MD5s."""
    from torchvision.datasets import cifar, svhn

    def present(fpath, md5=None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar, "check_integrity", present)
    monkeypatch.setattr(svhn, "check_integrity", present)


# --------------------------------------------------------------------------- MNIST family


@pytest.mark.parametrize("folder,name", [("MNIST", "mnist"), ("FashionMNIST", "fashionmnist")])
def test_mnist_family_reads_idx_files(tmp_path: Path, folder: str, name: str) -> None:
    arrays = write_mnist(tmp_path, folder)
    for split in ("train", "test"):
        data = load_dataset(name, tmp_path, split)
        images, labels = arrays[split]
        assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
        assert data.x.shape == (len(labels), 1, 28, 28)
        assert torch.equal(data.x, torch.from_numpy(images).float().unsqueeze(1) / 255)
        assert data.y.tolist() == labels.tolist()
        assert len(data.classes) == 10 and data.domains is None


def test_fashion_mnist_has_its_own_class_names(tmp_path: Path) -> None:
    write_mnist(tmp_path, "FashionMNIST")
    assert load_dataset("fashion-mnist", tmp_path, "train").classes[0] == "T-shirt/top"


def test_mnist_gz_files_are_unpacked(tmp_path: Path) -> None:
    import gzip

    arrays = write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    for path in list(raw.iterdir()):
        (raw / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    data = load_dataset("mnist", tmp_path, "test")
    assert data.y.tolist() == arrays["test"][1].tolist()


def test_mnist_missing_names_expected_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere", "train")
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path, "train")
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert "--download" in msg and "\n" not in msg


def test_mnist_corrupt_file_is_data_error(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("mnist", tmp_path, "train")


def test_resize_channels_and_normalisation(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    base = load_dataset("mnist", tmp_path, "test")
    rgb = load_dataset("mnist", tmp_path, "test", image_size=14, channels=3)
    assert rgb.x.shape == (20, 3, 14, 14)
    assert torch.equal(rgb.x[:, 0], rgb.x[:, 2])
    assert float(rgb.x.min()) >= 0.0 and float(rgb.x.max()) <= 1.0
    # A (filtered) downscale keeps each image's mean brightness.
    assert torch.allclose(rgb.x.mean((1, 2, 3)), base.x.mean((1, 2, 3)), atol=0.01)
    norm = load_dataset("mnist", tmp_path, "test", channels=3, normalize="imagenet")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(norm.x * std + mean, base.x.expand(-1, 3, -1, -1), atol=1e-6)
    with pytest.raises(ValueError, match="3 channels"):
        load_dataset("mnist", tmp_path, "test", normalize="imagenet")


# --------------------------------------------------------------------------- CIFAR-10, SVHN, USPS


def test_cifar10_reads_official_batches(tmp_path: Path, exact_checksums: None) -> None:
    written = write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path, "train")
    test = load_dataset("cifar-10", tmp_path, "test")
    assert train.x.shape == (30, 3, 32, 32) and test.x.shape == (8, 3, 32, 32)
    assert train.classes == CIFAR_CLASSES
    assert train.y.tolist() == written["y_train"].tolist()
    # Pixel (c, h, w) of image i is byte c*1024 + h*32 + w of its row.
    expected = torch.from_numpy(written["x_test"]).view(-1, 3, 32, 32).float() / 255
    assert torch.equal(test.x, expected)


def test_cifar10_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="checksum mismatch") as err:
        load_dataset("cifar10", tmp_path, "train")
    assert "data_batch_1" in str(err.value)


def test_cifar10_missing_batch(tmp_path: Path, exact_checksums: None) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", tmp_path, "train")


def test_svhn_reads_mat_files(tmp_path: Path, exact_checksums: None) -> None:
    sio = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(32, 32, 3, 7), dtype=np.uint8)  # H x W x C x N, as published
    y = np.array([[10], [1], [2], [10], [5], [9], [3]], dtype=np.uint8)  # "10" means digit 0
    sio.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    data = load_dataset("svhn", tmp_path, "test")
    assert data.y.tolist() == [0, 1, 2, 0, 5, 9, 3]
    assert data.x.shape == (7, 3, 32, 32)
    # torchvision's transpose (3, 2, 0, 1) yields N x C x W x H from the .mat's H x W x C x N.
    expected = torch.from_numpy(np.transpose(x, (3, 2, 0, 1)).copy()).float() / 255
    assert torch.equal(data.x, expected)
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", tmp_path, "train")


def test_svhn_without_scipy_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `import scipy.io` fail
    with pytest.raises(DataError, match="pip install scipy"):
        load_dataset("svhn", tmp_path, "test")


def test_usps_reads_bz2_libsvm(tmp_path: Path) -> None:
    written = write_usps(tmp_path)
    for split in ("train", "test"):
        data = load_dataset("usps", tmp_path, split)
        images, labels = written[split]
        assert data.x.shape == (len(labels), 1, 16, 16)
        assert torch.equal(data.x, torch.from_numpy(images).float().view(-1, 1, 16, 16) / 255)
        assert data.y.tolist() == labels.tolist()
    (tmp_path / "usps.t.bz2").unlink()
    with pytest.raises(DataError, match="usps.t.bz2"):
        load_dataset("usps", tmp_path, "test")


def test_usps_corrupt_is_data_error(tmp_path: Path) -> None:
    write_usps(tmp_path)
    (tmp_path / "usps.bz2").write_bytes(b"not bzip2")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("usps", tmp_path, "train")


# --------------------------------------------------------------------------- image folders


def test_image_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "ds", {"normal": 3, "abnormal": 2})
    data = load_dataset("imagefolder", tmp_path / "ds", "train")
    assert data.classes == ["abnormal", "normal"]  # sorted, as torchvision's ImageFolder
    assert data.y.tolist() == [0, 0, 1, 1, 1]
    assert data.x.shape == (5, 3, 8, 8)
    # Class "normal" (written as class 0) was coloured (0, 20 + i, 200).
    assert torch.allclose(data.x[2, :, 0, 0], torch.tensor([0, 20, 200]) / 255)
    gray = load_dataset("folder", tmp_path / "ds", "train", image_size=4, channels=1)
    assert gray.x.shape == (5, 1, 4, 4)
    assert not has_test_split("imagefolder", tmp_path / "ds")
    with pytest.raises(DataError, match="no test split"):
        load_dataset("imagefolder", tmp_path / "ds", "test")


def test_image_folder_train_test_subfolders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    write_image_folder(tmp_path / "test", {"a": 1, "b": 2})
    assert has_test_split("imagefolder", tmp_path)
    assert load_dataset("imagefolder", tmp_path, "test").y.tolist() == [0, 1, 1]


def test_image_folder_sizes_and_errors(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "1.png", (1, 2, 3), size=(8, 8))
    write_png(tmp_path / "a" / "2.jpg", (1, 2, 3), size=(12, 6))
    (tmp_path / "a" / "notes.txt").write_text("ignored: not an image")
    with pytest.raises(DataError, match="image size"):
        load_dataset("imagefolder", tmp_path, "train")
    assert load_dataset("imagefolder", tmp_path, "train", image_size=5).x.shape == (2, 3, 5, 5)
    (tmp_path / "a" / "3.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="3.png"):
        load_dataset("imagefolder", tmp_path, "train", image_size=5)


def test_image_folder_empty_or_nested_hints_domainfolder(tmp_path: Path) -> None:
    write_domain_folder(tmp_path, {"mnistm": {"0": 1}})
    with pytest.raises(DataError, match="domainfolder"):
        load_dataset("imagefolder", tmp_path, "train")
    with pytest.raises(DataError, match="not found"):
        load_dataset("imagefolder", tmp_path / "missing", "train")


def test_domain_folder(tmp_path: Path) -> None:
    write_domain_folder(
        tmp_path, {"svhn": {"0": 2, "1": 1}, "mnist": {"1": 2, "2": 1}, "usps": {"0": 1}}
    )
    data = load_dataset("domainfolder", tmp_path, "train")
    assert data.classes == ["0", "1", "2"]  # union over domains, one label space
    assert data.domain_names == ["mnist", "svhn", "usps"]
    assert data.domains is not None
    assert data.domains.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert data.y.tolist() == [1, 1, 2, 0, 0, 1, 0]
    assert data.x.shape == (7, 3, 8, 8)


# --------------------------------------------------------------------------- names, arguments


def test_names_and_arguments(tmp_path: Path) -> None:
    assert canonical_name("CIFAR-10") == "cifar10" and canonical_name("domains") == "domainfolder"
    assert set(DATASETS) == {canonical_name(n) for n in DATASETS}
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path, "train")
    with pytest.raises(ValueError, match="channels"):
        load_dataset("mnist", tmp_path, "train", channels=2)
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", tmp_path, "val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image size"):
        load_dataset("mnist", tmp_path, "train", image_size=0)
