"""A silo's own data where it lies (lssfl.dataprep.silodata): image folders and uint8 splits read
per batch, with the labels every silo agrees on, and `lssfl partition` for one hospital."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from lssfl.dataprep.datasets import load_dataset
from lssfl.dataprep.silodata import (
    ImageFolderImages,
    ImageTransform,
    UInt8Images,
    check_num_classes,
    open_silo_data,
    subset,
)
from lssfl.dataprep.splits import DataError, load_split, save_split
from lssfl.training.trainers import FedAvgTrainer
from tests.conftest import run_lssfl

RAW = ImageTransform(resize=None, crop=None, normalize=None)


def _images(folder, counts, size=8, seed=0):
    """``counts``: {class: number of random RGB PNGs}; returns the folder."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{seed}-{i}.png")
    return folder


def test_declared_classes_fix_the_labels_whatever_a_silo_holds(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nfox\n")
    # This silo has no "cat": its dogs are still label 1, its foxes label 2.
    folder = _images(tmp_path / "silo", {"dog": 2, "fox": 3})
    data = open_silo_data(folder, classes, RAW)
    assert data.num_classes == 3 and data.y.tolist() == [1, 1, 2, 2, 2]
    assert isinstance(data.x, ImageFolderImages) and data.test is None
    batch = data.x[torch.tensor([4, 0])]
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == torch.float32
    expected = np.asarray(Image.open(folder / "fox" / "0-2.png"), dtype=np.float32) / 255
    assert torch.equal(batch[0], torch.from_numpy(expected).permute(2, 0, 1))
    check_num_classes(data, 3)
    with pytest.raises(DataError, match="3 classes but the model outputs 10"):
        check_num_classes(data, 10)

    _images(folder, {"wolf": 1})
    with pytest.raises(DataError, match="class folder 'wolf' is not in the declared class list"):
        open_silo_data(folder, classes, RAW)
    with pytest.raises(DataError, match="needs its class list, the same on every silo"):
        open_silo_data(folder, None, RAW)


def test_train_and_test_parts_and_transforms(tmp_path):
    folder = tmp_path / "silo"
    _images(folder / "train", {"a": 3, "b": 3}, size=12)
    _images(folder / "test", {"a": 1, "b": 2}, size=12, seed=1)
    (folder / "classes.txt").write_text("a\nb\n")
    data = open_silo_data(folder, transform=ImageTransform(resize=10, crop=6))
    assert data.num_samples == 6 and data.test is not None and data.test.y.tolist() == [0, 1, 1]
    x = data.x[0:6]
    assert x.shape == (6, 3, 6, 6)
    assert x.min() < -0.5  # ImageNet normalisation by default
    held = subset(data.x, torch.tensor([5, 1]))
    assert len(held) == 2 and torch.equal(held[0:2], x[torch.tensor([5, 1])])


def test_a_trainer_on_lazy_images_gives_the_same_model_as_on_tensors(tmp_path):
    folder = _images(tmp_path / "silo", {"a": 10, "b": 7}, size=8)
    (folder / "classes.txt").write_text("a\nb\n")
    data = open_silo_data(folder, transform=RAW, workers=3)
    eager = data.x[0 : len(data.x)]
    models = []
    for x in (data.x, eager):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        FedAvgTrainer(epochs=2, batch_size=4).train(model, x, data.y, seed=3)
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_uint8_split_is_read_per_batch_and_matches_the_float_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8, generator=g)
    y = torch.arange(9) % 3
    save_split(tmp_path / "u8", pixels, y, {"num_classes": 3, "normalize": "imagenet"})
    data = open_silo_data(tmp_path / "u8")
    assert isinstance(data.x, UInt8Images) and data.y.tolist() == y.tolist()
    whole = load_split(tmp_path / "u8").x  # the coordinator's way: float32 at once
    assert whole.dtype == torch.float32
    assert torch.equal(data.x[torch.tensor([7, 2])], whole[torch.tensor([7, 2])])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(DataError, match="bad/data.safetensors: unreadable or corrupt"):
        open_silo_data(tmp_path / "bad")


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from PIL import Image
    from lssfl.dataprep.datasets import load_dataset
    from lssfl.dataprep.silodata import ImageTransform, open_silo_data
    from lssfl.dataprep.splits import save_split

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def grow(folder, count):
        rng = np.random.default_rng(count)
        for i in range(count):
            c = folder / ("a" if i % 2 else "b")
            c.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(
                c / f"{count}-{i}.png")

    def epoch_growth(x):
        x[0:32].sum()  # warm: threads, allocator
        start, peak = rss(), 0
        for idx in torch.randperm(len(x)).split(32):
            x[idx].sum()
            peak = max(peak, rss() - start)
        return peak

    root, n = Path(sys.argv[1]), int(sys.argv[2])
    folder = root / "images"
    (root / "classes.txt").write_text("a\\nb\\n")
    raw = ImageTransform(None, None, None)
    out = {}
    grow(folder, n)
    for size in (n, 4 * n):
        if size > n:
            grow(folder, size - n)
        data = open_silo_data(folder, root / "classes.txt", raw, workers=2)
        out[f"folder_{size}"] = epoch_growth(data.x)
        split = root / f"u8-{size}"
        save_split(split, (data.x[0:size] * 255).round().to(torch.uint8), data.y)
        out[f"uint8_{size}"] = epoch_growth(open_silo_data(split).x)
        del data
    before = rss()
    eager = load_dataset("imagefolder", folder)  # the float tensor the issue starts from
    out["eager_float32"] = rss() - before
    print(json.dumps(out))
    """
)


def test_lazy_silo_memory_stays_flat_as_the_folder_grows(tmp_path):
    # One fresh process, so that the figures are its own: RSS growth during one epoch over N
    # and over 4N images, from an image folder and from a uint8 split.
    n = 120
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path), str(n)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout)
    floor = 4 * 2**20  # allocator granularity: growth below it is noise, not data
    for kind in ("folder", "uint8"):
        ratio = max(growth[f"{kind}_{4 * n}"], floor) / max(growth[f"{kind}_{n}"], floor)
        assert ratio < 1.5, growth
    # The control: the measurement does see a dataset held in memory (4N x 3 x 48 x 48 fp32).
    assert growth["eager_float32"] > 4 * n * 3 * 48 * 48 * 4 * 0.9, growth
    assert growth["eager_float32"] > 3 * max(growth[f"folder_{4 * n}"], floor), growth


def test_partition_converts_one_hospitals_images_without_a_test_split(tmp_path):
    _images(tmp_path / "hospital", {"benign": 5, "malignant": 4}, size=10)
    out = tmp_path / "out"
    (out / "test").mkdir(parents=True)  # an earlier partition's test split goes
    save_split(out / "test", torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.int64))
    proc = run_lssfl(
        "partition", "--dataset", "imagefolder", "--root", str(tmp_path / "hospital"),
        "--out", str(out), "--silos", "1", "--test-fraction", "0", "--uint8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["split   samples  0  1", "silo-1        9  5  4"]
    assert f"wrote 1 splits and partition.json to {out}" in proc.stdout
    assert not (out / "test").exists()
    summary = json.loads((out / "partition.json").read_text())
    assert summary["test_source"] == "none" and summary["pixels"] == "uint8"
    data = open_silo_data(out / "silo-1")
    assert isinstance(data.x, UInt8Images) and data.num_samples == 9
    float32 = load_dataset("imagefolder", tmp_path / "hospital")
    assert torch.allclose(data.x[0:9], float32.x, atol=0.5 / 255)
