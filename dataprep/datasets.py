"""Real datasets from a local folder, as tensors ready to be cut into silo splits.

Every loader returns a :class:`LabelledData`: images ``x`` (float32, N x C x H x W, in [0,1]
unless ``normalize`` is asked for), labels ``y`` (int64), the class names, and for
multi-domain image folders a per-sample domain index.

Published benchmarks are read with torchvision's own dataset classes, so the files are
exactly the ones torchvision downloads (``download=True``) or that a user copied by hand:

* ``mnist`` / ``fashionmnist``: ``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
  (``FashionMNIST`` instead of ``MNIST``); a ``.gz`` next to a missing file is unpacked.
* ``cifar10``: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.
* ``svhn``: ``ROOT/{train,test}_32x32.mat`` (needs scipy).
* ``usps``: ``ROOT/usps.bz2`` and ``ROOT/usps.t.bz2``.

Image folders are read with PIL, converted to RGB (or grayscale) and resized:

* ``imagefolder``: ``ROOT/<class>/*.png|jpg|...`` (e.g. one hospital's own images).
* ``domainfolder``: ``ROOT/<domain>/<class>/*`` (Digit-5, DomainNet, Office-Home style).

An image folder has a test split only when ``ROOT/train`` and ``ROOT/test`` both exist, each
in the layout above; otherwise the whole folder is the train split.

Nothing here touches the network unless ``download=True``; every missing or unreadable input
raises :class:`~lssfl.dataprep.splits.DataError` naming the path and what was expected.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lssfl.common.logs import one_line
from lssfl.dataprep.catalog import canonical_name
from lssfl.dataprep.splits import IMAGENET_MEAN, IMAGENET_STD, DataError

# A published dataset's own train or test part (not a split folder, lssfl.dataprep.splits.Split).
DatasetPart = Literal["train", "test"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# ITU-R 601-2 luma, the weights PIL uses for "L", so RGB->gray matches a PIL conversion.
_LUMA = (0.299, 0.587, 0.114)
# Converting in chunks bounds the float32 copy that exists next to the uint8 source.
_CHUNK = 4096

DIGIT_CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class LabelledData:
    """A source dataset's train or test part as read, before ``lssfl partition`` cuts it:
    ``x`` float32 N x C x H x W, ``y`` int64 N, class names.

    ``domains`` (int64 N, indexes ``domain_names``) is set only for multi-domain folders.
    Not :class:`lssfl.dataprep.splits.Split`, which is one split folder read back from disk:
    that one carries its ``meta.json`` (split name, class count, domain) instead of names.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    domains: torch.Tensor | None = None
    domain_names: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Number of samples."""
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        """Size of the label space (classes may have no samples in this split)."""
        return len(self.classes)


@dataclass(frozen=True)
class _Raw:
    """What a format reader returns before conversion: uint8 N x C x H x W images."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    domains: torch.Tensor | None = None
    domain_names: list[str] = field(default_factory=list)


def has_test_split(name: str, root: Path) -> bool:
    """Whether ``name`` under ``root`` comes with its own test split."""
    name = canonical_name(name)
    if name in ("imagefolder", "domainfolder"):
        return (Path(root) / "train").is_dir() and (Path(root) / "test").is_dir()
    return True


# --------------------------------------------------------------------------- torchvision sets


def _construct(what: str, root: Path, download: bool, make: Callable[[], Any]) -> Any:
    """Run a torchvision constructor, turning its many failure types into one DataError."""
    try:
        return make()
    except DataError:
        raise
    except Exception as exc:  # torchvision raises assert/Runtime/Type/OSError for bad files
        if download:
            raise DataError(f"{what}: could not download to {root}: {one_line(exc)}") from None
        raise DataError(f"{what} under {root}: unreadable or corrupt: {one_line(exc)}") from None


def _require_files(what: str, root: Path, paths: list[Path], download: bool) -> None:
    if download:
        return
    for path in paths:
        if not path.is_file():
            raise DataError(
                f"{what} not found under {root}: expected {path} "
                "(pass --download on a machine with internet)"
            )


def _read_mnist(folder: str, root: Path, split: DatasetPart, download: bool) -> _Raw:
    from torchvision import datasets

    cls = {"MNIST": datasets.MNIST, "FashionMNIST": datasets.FashionMNIST}[folder]
    raw = root / folder / "raw"
    # torchvision checks for all four files whichever split is asked for.
    names = [
        f"{p}-{k}" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    if not download:
        for name in names:
            _gunzip_if_needed(raw / name)
    # Name the requested split's files first: those are the ones the user cares about.
    prefix = "train" if split == "train" else "t10k"
    names.sort(key=lambda n: not n.startswith(prefix))
    _require_files(folder, root, [raw / n for n in names], download)
    ds = _construct(
        folder, root, download, lambda: cls(str(root), train=split == "train", download=download)
    )
    images = ds.data.unsqueeze(1)  # N x 28 x 28 uint8 -> N x 1 x 28 x 28
    return _Raw(images, ds.targets.long(), list(ds.classes))


def _gunzip_if_needed(path: Path) -> None:
    """Unpack ``path.gz`` to ``path`` when only the archive is there, as torchvision would."""
    gz = path.with_name(path.name + ".gz")
    if path.exists() or not gz.is_file():
        return
    tmp = path.with_name(path.name + ".partial")
    try:
        with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(path)
    except (OSError, EOFError) as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{gz}: cannot unpack to {path}: {one_line(exc)}") from None


def _read_cifar10(root: Path, split: DatasetPart, download: bool) -> _Raw:
    from torchvision import datasets
    from torchvision.datasets import cifar

    base = root / datasets.CIFAR10.base_folder
    files = [name for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list]
    files.append(datasets.CIFAR10.meta["filename"])
    _require_files("CIFAR-10", root, [base / f for f in files], download)
    # The official CIFAR-10 "python version" is a set of pickled batches; torchvision unpickles
    # them. That is acceptable only because these are local files the operator downloaded and
    # torchvision first checks each one against the published MD5, so only the genuine
    # dataset bytes ever reach pickle. Never point this at data received over the network.
    if not download:  # with download, torchvision itself replaces a file that fails its MD5
        _check_md5s("CIFAR-10", cifar.check_integrity, base, _cifar_checksums(datasets.CIFAR10))
    ds = _construct(
        "CIFAR-10",
        root,
        download,
        lambda: datasets.CIFAR10(str(root), split == "train", download=download),
    )
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)  # HWC -> CHW
    return _Raw(images, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def _cifar_checksums(cls: Any) -> list[tuple[str, str]]:
    pairs = [(name, md5) for name, md5 in cls.train_list + cls.test_list]
    return [*pairs, (cls.meta["filename"], cls.meta["md5"])]


def _check_md5s(
    what: str, check: Callable[..., bool], base: Path, pairs: list[tuple[str, str]]
) -> None:
    """Name the first file whose checksum differs, which torchvision's own error does not."""
    for name, md5 in pairs:
        path = base / name
        if path.is_file() and not check(str(path), md5):
            raise DataError(
                f"{path}: checksum mismatch, not the official {what} file "
                "(re-download it, e.g. with --download)"
            )


def _read_svhn(root: Path, split: DatasetPart, download: bool) -> _Raw:
    try:
        import scipy.io  # noqa: F401  (torchvision reads the .mat files with it)
    except ImportError:
        raise DataError("SVHN needs scipy to read its .mat files: pip install scipy") from None
    from torchvision import datasets
    from torchvision.datasets import svhn

    _, filename, md5 = datasets.SVHN.split_list[split]
    _require_files("SVHN", root, [root / filename], download)
    if not download:
        _check_md5s("SVHN", svhn.check_integrity, root, [(filename, md5)])
    ds = _construct(
        "SVHN", root, download, lambda: datasets.SVHN(str(root), split, download=download)
    )
    images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already N x 3 x 32 x 32
    return _Raw(images, torch.from_numpy(ds.labels).long(), list(DIGIT_CLASSES))


def _read_usps(root: Path, split: DatasetPart, download: bool) -> _Raw:
    from torchvision import datasets

    filename = datasets.USPS.split_list[split][1]
    _require_files("USPS", root, [root / filename], download)
    ds = _construct(
        "USPS",
        root,
        download,
        lambda: datasets.USPS(str(root), split == "train", download=download),
    )
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).unsqueeze(1)
    return _Raw(images, torch.as_tensor(ds.targets, dtype=torch.int64), list(DIGIT_CLASSES))


# --------------------------------------------------------------------------- image folders


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _split_base(root: Path, split: DatasetPart, layout: str) -> Path:
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (expected {layout})")
    if has_test_split("imagefolder", root):
        return root / split
    if split == "test":
        raise DataError(
            f"{root}: no test split (expected {root}/train and {root}/test); "
            "hold out a fraction of the train split instead"
        )
    return root


def _read_image_folder(
    root: Path, split: DatasetPart, image_size: int | None, channels: int
) -> _Raw:
    layout = "ROOT/<class>/*.png|jpg"
    base = _split_base(root, split, layout)
    class_dirs = _subdirs(base)
    files = [(path, label) for label, d in enumerate(class_dirs) for path in _images_in(d)]
    if not files:
        raise DataError(
            f"no images found under {base}: expected {layout} "
            "(for ROOT/<domain>/<class>/ use --dataset domainfolder)"
        )
    images = _read_images([p for p, _ in files], image_size, channels)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return _Raw(images, labels, [d.name for d in class_dirs])


def _read_domain_folder(
    root: Path, split: DatasetPart, image_size: int | None, channels: int
) -> _Raw:
    layout = "ROOT/<domain>/<class>/*.png|jpg"
    base = _split_base(root, split, layout)
    domain_dirs = _subdirs(base)
    # One label space across domains, so class "dog" has the same index on every silo even
    # where a domain lacks some classes.
    classes = sorted({c.name for d in domain_dirs for c in _subdirs(d)})
    index = {name: i for i, name in enumerate(classes)}
    files: list[tuple[Path, int, int]] = []
    for dom, d in enumerate(domain_dirs):
        for c in _subdirs(d):
            files.extend((path, index[c.name], dom) for path in _images_in(c))
    if not files:
        raise DataError(f"no images found under {base}: expected {layout}")
    images = _read_images([p for p, _, _ in files], image_size, channels)
    labels = torch.tensor([c for _, c, _ in files], dtype=torch.int64)
    domains = torch.tensor([d for _, _, d in files], dtype=torch.int64)
    return _Raw(images, labels, classes, domains, [d.name for d in domain_dirs])


def _read_images(paths: list[Path], image_size: int | None, channels: int) -> torch.Tensor:
    """Decode ``paths`` with PIL into one uint8 N x C x H x W tensor (resized if asked)."""
    from PIL import Image, UnidentifiedImageError

    mode = "RGB" if channels == 3 else "L"
    out: np.ndarray | None = None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as opened:
                img = opened.convert(mode)
                if image_size is not None and img.size != (image_size, image_size):
                    # PIL's bilinear resize filters over the whole footprint when shrinking,
                    # so large photos do not alias into noise.
                    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"{path}: unreadable image: {one_line(exc)}") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if out is None:
            # Preallocate once: stacking a list would hold every image twice.
            out = np.empty((len(paths), *arr.shape), dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise DataError(
                f"{path}: size {arr.shape[1]}x{arr.shape[0]} differs from "
                f"{out.shape[2]}x{out.shape[1]} of {paths[0]}; pass an image size to resize all"
            )
        out[i] = arr
    assert out is not None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- conversion


def _to_float(
    images: torch.Tensor, image_size: int | None, channels: int | None, normalize: str | None
) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 in [0,1] (or normalised), resized and re-channelled."""
    n, c, h, w = images.shape
    out_c = channels or c
    out_h, out_w = (image_size, image_size) if image_size else (h, w)
    out = torch.empty((n, out_c, out_h, out_w), dtype=torch.float32)
    luma = torch.tensor(_LUMA).view(1, 3, 1, 1)
    for start in range(0, n, _CHUNK):
        x = images[start : start + _CHUNK].float().div_(255.0)
        if (out_h, out_w) != (h, w):
            x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True)
            x = x.clamp_(0.0, 1.0)
        if out_c != c:
            x = (x * luma).sum(1, keepdim=True) if out_c == 1 else x.expand(-1, out_c, -1, -1)
        out[start : start + len(x)] = x
    if normalize == "imagenet":
        if out_c != 3:
            raise ValueError("ImageNet normalisation needs 3 channels; pass channels=3")
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out.sub_(mean).div_(std)
    return out


def _check_args(
    split: str, image_size: int | None, channels: int | None, normalize: str | None
) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image size must be a positive integer, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if normalize not in (None, "imagenet"):
        raise ValueError(f"normalize must be None or 'imagenet', got {normalize!r}")


def _check_labels(what: str, raw: _Raw) -> None:
    if raw.labels.numel() == 0:
        raise DataError(f"{what}: no samples")
    lo, hi = int(raw.labels.min()), int(raw.labels.max())
    if lo < 0 or hi >= len(raw.classes):
        raise DataError(
            f"{what}: labels span [{lo}, {hi}] but there are {len(raw.classes)} classes"
        )


def load_dataset(
    name: str,
    root: Path,
    split: DatasetPart = "train",
    image_size: int | None = None,
    channels: int | None = None,
    download: bool = False,
    *,
    normalize: str | None = None,
) -> LabelledData:
    """Load ``split`` of dataset ``name`` stored under ``root`` (see the module docstring).

    ``image_size`` resizes to a square (None keeps the native size; image folders of mixed
    sizes need one). ``channels`` converts to 1 (luma) or 3 (replicated gray); None keeps
    the dataset's own, RGB for image folders. ``normalize="imagenet"`` applies the ImageNet
    mean/std that torchvision's pretrained weights expect; otherwise pixels are in [0,1].
    ``download=True`` lets torchvision fetch a missing benchmark (needs internet).
    """
    _check_args(split, image_size, channels, normalize)
    key = canonical_name(name)
    root = Path(root).expanduser()
    if key in ("imagefolder", "domainfolder"):
        reader = _read_image_folder if key == "imagefolder" else _read_domain_folder
        raw = reader(root, split, image_size, channels or 3)
    else:
        if not download and not root.is_dir():
            raise DataError(f"{name}: dataset root {root} does not exist")
        readers: dict[str, Callable[[Path, DatasetPart, bool], _Raw]] = {
            "mnist": lambda r, s, d: _read_mnist("MNIST", r, s, d),
            "fashionmnist": lambda r, s, d: _read_mnist("FashionMNIST", r, s, d),
            "cifar10": _read_cifar10,
            "svhn": _read_svhn,
            "usps": _read_usps,
        }
        raw = readers[key](root, split, download)
    _check_labels(f"{key} {split} split under {root}", raw)
    x = _to_float(raw.images, image_size, channels, normalize)
    return LabelledData(x, raw.labels.contiguous(), raw.classes, raw.domains, raw.domain_names)
