"""A silo's own data where it lies: a split folder, or an image folder read batch by batch.

``--data DIR`` of ``lssfl silo`` is one of:

* a split folder (``lssfl.dataprep.splits``): ``DIR/data.safetensors``. With ``x`` stored as
  float32 it is loaded whole, as it always was. With ``x`` stored as uint8 (``lssfl partition
  --uint8``) it stays on disk: each batch's images are read with ``pread`` and converted to
  float32 then, so memory does not grow with the number of images. An optional
  ``DIR/test/`` split folder is the silo's own test split.
* an image folder: ``DIR/<class>/*.png|jpg|...``, or ``DIR/train/<class>/...`` with
  ``DIR/test/<class>/...`` as the silo's own test split. Images are decoded per batch with
  torchvision's ``ImageFolder`` and the usual transforms (resize, center crop, to tensor,
  ImageNet normalisation), in a pool of worker threads. Threads, not DataLoader worker
  processes: gRPC does not survive ``fork()`` in a process with live channels, and PIL's
  decoding and resizing release the GIL.

The class list of an image folder is declared, the same file on every silo (``--classes
FILE``, else ``DIR/classes.txt``, one name per line): label ``i`` is line ``i`` whichever
classes a silo happens to hold, so silos agree on the labels. A class folder not on the list
is an error, not a silently dropped class.

Lazily read images behave like the tensor the trainers index: ``len(x)``, ``x[indices]`` (a
float32 batch on the silo's device), ``x.device``, ``x.to(device)``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from lssfl.common.logs import one_line
from lssfl.dataprep.splits import (
    DATA_FILE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    META_FILE,
    DataError,
    Split,
    load_split,
    pixels_to_float,
)

CLASSES_FILE = "classes.txt"
# A safetensors header larger than this is not one lssfl wrote: refuse before reading it.
MAX_HEADER_BYTES = 1 << 20
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class ImageTransform:
    """How an image folder's pictures become tensors: resize the shorter side, crop the
    centre square, scale to [0, 1], optionally normalise with the ImageNet mean/std."""

    resize: int | None = 256
    crop: int | None = 224
    normalize: str | None = "imagenet"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a positive number of pixels, got {value!r}")
        if self.normalize not in (None, "imagenet"):
            raise ValueError(f"--normalize must be imagenet or none, got {self.normalize!r}")

    def build(self) -> Callable[[Any], Tensor]:
        """The torchvision transform pipeline."""
        from torchvision import transforms

        steps: list[Any] = []
        if self.resize:
            steps.append(transforms.Resize(self.resize))
        if self.crop:
            steps.append(transforms.CenterCrop(self.crop))
        steps.append(transforms.ToTensor())
        if self.normalize == "imagenet":
            steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
        return transforms.Compose(steps)


class LazyImages:
    """Images read per batch: indexing with a tensor, list or slice of positions returns a
    float32 N x C x H x W batch on ``device``. ``subset`` selects without reading."""

    def __init__(self, count: int, device: torch.device | None = None) -> None:
        self._positions: np.ndarray = np.arange(count, dtype=np.int64)
        self.device = device or torch.device("cpu")

    def __len__(self) -> int:
        return len(self._positions)

    def to(self, device: torch.device | str) -> LazyImages:
        """The same images, batches delivered on ``device``."""
        other = self._copy()
        other.device = torch.device(device)
        return other

    def subset(self, indices: Tensor) -> LazyImages:
        """The images at ``indices`` (positions in this one), not read yet."""
        other = self._copy()
        other._positions = self._positions[indices.cpu().numpy()]
        return other

    def __getitem__(self, index: Tensor | slice | Sequence[int]) -> Tensor:
        if isinstance(index, slice):
            chosen = self._positions[index]
        else:
            chosen = self._positions[torch.as_tensor(index).cpu().numpy()]
        return self._read([int(i) for i in chosen]).to(self.device)

    def _copy(self) -> LazyImages:
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        return other

    def _read(self, items: list[int]) -> Tensor:
        raise NotImplementedError


class ImageFolderImages(LazyImages):
    """An image folder, decoded and transformed per batch by ``workers`` threads."""

    def __init__(self, root: Path, classes: list[str], transform: ImageTransform, workers: int):
        from torchvision.datasets import ImageFolder

        declared = {name: i for i, name in enumerate(classes)}

        class DeclaredClasses(ImageFolder):
            def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
                present = sorted(e.name for e in os.scandir(directory) if e.is_dir())
                unknown = [c for c in present if c not in declared and not c.startswith(".")]
                if unknown:
                    raise DataError(
                        f"{directory}: class folder {unknown[0]!r} is not in the declared class "
                        f"list ({len(classes)} classes)"
                    )
                return classes, declared

        try:
            self.dataset = DeclaredClasses(str(root), transform.build(), allow_empty=True)
        except DataError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(f"{root}: not a readable image folder: {one_line(exc)}") from None
        if not self.dataset.samples:
            raise DataError(f"no images found under {root}: expected {root}/<class>/*.png|jpg")
        self.labels = torch.tensor(self.dataset.targets, dtype=torch.int64)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="images")
        super().__init__(len(self.dataset.samples))

    def _read_one(self, item: int) -> Tensor:
        path = self.dataset.samples[item][0]
        try:
            image = self.dataset.loader(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable image: {one_line(exc)}") from None
        return self.dataset.transform(image)

    def _read(self, items: list[int]) -> Tensor:
        images = list(self._pool.map(self._read_one, items))
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) > 1:
            raise DataError(
                f"images of different sizes {sorted(shapes)[:2]} in one batch: set a crop size "
                "(--crop) so that all come out the same"
            )
        return torch.stack(images)


class UInt8Images(LazyImages):
    """``x`` of a split folder stored as uint8, read per batch with pread and converted to
    float32 in [0, 1] (then normalised when the split's meta.json says so)."""

    def __init__(self, path: Path, normalize: str | None) -> None:
        header, start = _safetensors_header(path)
        spec = header["x"]
        shape = [int(d) for d in spec["shape"]]
        if spec.get("dtype") != "U8" or len(shape) != 4 or min(shape) < 1:
            raise DataError(
                f"{path}: x must be uint8 N x C x H x W, got {spec.get('dtype')} {shape}"
            )
        begin, end = (int(v) for v in spec["data_offsets"])
        self.sample_shape = tuple(shape[1:])
        self._sample_bytes = int(np.prod(self.sample_shape))
        if end - begin != shape[0] * self._sample_bytes or start + end > path.stat().st_size:
            raise DataError(f"{path}: x's data does not match its shape {shape}")
        self._path, self._offset = path, start + begin
        self._normalize = normalize
        super().__init__(shape[0])

    def _read(self, items: list[int]) -> Tensor:
        out = np.empty((len(items), self._sample_bytes), dtype=np.uint8)
        # Plain reads, not a memory map: mapped pages would stay resident as the epoch
        # touches them, and the process would grow to the file's size.
        with open(self._path, "rb") as f:
            for row, item in enumerate(items):
                where = self._offset + item * self._sample_bytes
                data = os.pread(f.fileno(), self._sample_bytes, where)
                if len(data) != self._sample_bytes:
                    raise DataError(f"{self._path}: truncated at image {item}")
                out[row] = np.frombuffer(data, dtype=np.uint8)
        return pixels_to_float(
            torch.from_numpy(out).view(len(items), *self.sample_shape), self._normalize
        )


@dataclass(frozen=True)
class SiloData:
    """What a silo trains on: images ``x`` (a tensor, or read per batch), labels ``y``, the
    size of the label space, and the silo's own test split if it has one."""

    x: Tensor | LazyImages
    y: Tensor
    num_classes: int
    kind: str  # for the log: how the images are held
    test: SiloData | None = None

    @property
    def num_samples(self) -> int:
        """Number of samples."""
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> SiloData:
        """The same data with batches (or the tensors) on ``device``."""
        test = None if self.test is None else self.test.to(device)
        return replace(self, x=self.x.to(device), y=self.y.to(device), test=test)


def as_tensor(x: Tensor | LazyImages) -> Tensor:
    """``x`` typed as the tensor the trainers and ``evaluate`` take: lazy images answer
    everything they use of one (``len``, indexing by positions or a slice, ``.device``)."""
    return cast(Tensor, x)


def subset(x: Tensor | LazyImages, indices: Tensor) -> Tensor | LazyImages:
    """``x`` at ``indices``: a copy for a tensor, an unread selection for lazy images."""
    return x.subset(indices) if isinstance(x, LazyImages) else x[indices.to(x.device)]


def open_silo_data(
    folder: Path,
    classes_file: Path | None = None,
    transform: ImageTransform | None = None,
    workers: int = 4,
    with_test: bool = True,
) -> SiloData:
    """The silo data in ``folder`` (see the module docstring); DataError names what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"{folder}: data folder missing" if not folder.exists() else f"{folder}: not a folder"
        )
    own_test = folder / "test"
    if (folder / DATA_FILE).is_file():
        data = _split_folder(folder)
        if with_test and (own_test / DATA_FILE).is_file():
            data = replace(data, test=_split_folder(own_test))
        return data
    classes = _declared_classes(folder, classes_file)
    transform = transform or ImageTransform()
    has_parts = (folder / "train").is_dir() and own_test.is_dir()
    train = ImageFolderImages(
        folder / "train" if has_parts else folder, classes, transform, workers
    )
    data = SiloData(train, train.labels, len(classes), "image folder, decoded per batch")
    if with_test and has_parts:
        test = ImageFolderImages(own_test, classes, transform, workers)
        data = replace(data, test=SiloData(test, test.labels, len(classes), data.kind))
    return data


def _split_folder(folder: Path) -> SiloData:
    header, start = _safetensors_header(folder / DATA_FILE)
    if header.get("x", {}).get("dtype") != "U8":
        split: Split = load_split(folder)
        return SiloData(split.x, split.y, split.num_classes, "float32 tensors in memory")
    # Labels and metadata checked as for any split, without reading the images.
    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}
    num_classes = int(meta.get("num_classes", 10))
    try:
        x = UInt8Images(folder / DATA_FILE, meta.get("normalize"))
        y = _read_labels(folder / DATA_FILE, header, start, len(x))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{folder / DATA_FILE}: malformed header: {one_line(exc)}") from None
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(f"{folder / DATA_FILE}: labels out of range [0, {num_classes})")
    return SiloData(x, y, num_classes, "uint8 on disk, read per batch")


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts (no tensor read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise DataError(f"{path}: header of {size} bytes is not a split's")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt: {one_line(exc)}") from None
    if not isinstance(header, dict) or "x" not in header or "y" not in header:
        raise DataError(f"{path}: must hold tensors 'x' and 'y'")
    return header, 8 + size


def _read_labels(path: Path, header: dict[str, Any], start: int, count: int) -> Tensor:
    spec = header["y"]
    begin, end = (int(v) for v in spec["data_offsets"])
    if (
        spec.get("dtype") != "I64"
        or [int(d) for d in spec["shape"]] != [count]
        or end - begin != 8 * count
    ):
        raise DataError(f"{path}: y must be int64 of shape ({count},)")
    with open(path, "rb") as f:
        f.seek(start + begin)
        data = f.read(8 * count)
    return torch.from_numpy(np.frombuffer(data, dtype="<i8").copy())


def _declared_classes(folder: Path, classes_file: Path | None) -> list[str]:
    path = classes_file or folder / CLASSES_FILE
    if not path.is_file():
        raise DataError(
            f"{folder}: an image folder needs its class list, the same on every silo: "
            f"--classes FILE or {folder / CLASSES_FILE} (one class folder name per line)"
        )
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable class list: {one_line(exc)}") from None
    names = [n for n in names if n]
    if not names or len(names) > MAX_CLASSES or len(set(names)) != len(names):
        raise DataError(f"{path}: the class list must name 1 to {MAX_CLASSES} distinct classes")
    return names


def check_num_classes(data: SiloData, model_classes: int | None) -> None:
    """DataError unless the model's outputs cover the data's label space (and, for a
    declared class list, are exactly that many)."""
    if model_classes is None:
        return
    declared = isinstance(data.x, ImageFolderImages)
    if model_classes < data.num_classes or (declared and model_classes != data.num_classes):
        raise DataError(
            f"the silo's data has {data.num_classes} classes but the model outputs "
            f"{model_classes}: declare the same classes on every silo and in model.kwargs"
        )
