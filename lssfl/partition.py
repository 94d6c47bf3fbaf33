"""``lssfl partition``: cut a real dataset into per-silo split folders for a federated run.

Output under ``OUT``: ``silo-1 .. silo-N`` and ``test``, each a split folder readable by
:func:`lssfl.dataprep.splits.load_split`, and ``partition.json`` with the parameters and the
per-split class counts. Same arguments and seed -> byte-identical output.

Schemes:

* ``dirichlet``: label skew. For each class, the silos' shares are drawn from
  Dirichlet(alpha); small alpha concentrates each class on few silos, large alpha tends to IID.
* ``iid``: a uniformly random, equal-sized deal.
* ``domain``: silo k gets the k-th domain (sorted by name) of a ``domainfolder`` dataset.

The test split is the dataset's own when it has one, else a class-stratified (and
domain-stratified) held-out fraction of the data, taken before the silos are dealt.

This module imports torch only inside :func:`run`, so ``lssfl partition --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lssfl.common.files import atomic_write_text
from lssfl.dataprep.catalog import DATASETS, canonical_name
from lssfl.dataprep.dirichlet import check_alpha, check_counts, dirichlet_split

if TYPE_CHECKING:
    from lssfl.dataprep.datasets import LabelledData

SCHEMES = ("dirichlet", "iid", "domain")
SUMMARY_FILE = "partition.json"
# Above this many classes the printed table shows a count of classes present instead of one
# column per class (partition.json always has the full counts).
MAX_CLASS_COLUMNS = 20

EPILOG = """examples:
  lssfl partition --dataset cifar10 --root ~/data --out data/cifar-5 --silos 5 --alpha 0.5
  lssfl partition --dataset domainfolder --root ~/data/digit5 --out data/digit5 \\
      --silos 5 --scheme domain --image-size 32
  lssfl partition --dataset mnist --root ~/data --out data/mnist --silos 3 --scheme iid \\
      --channels 3 --download"""


# --------------------------------------------------------------------------- index splitting


def iid_split(num_samples: int, num_silos: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random deal of ``range(num_samples)`` into ``num_silos`` near-equal sorted parts."""
    check_counts(num_samples, num_silos)
    return [np.sort(p) for p in np.array_split(rng.permutation(num_samples), num_silos)]


def domain_split(domains: np.ndarray, domain_names: list[str], num_silos: int) -> list[np.ndarray]:
    """One domain per silo: part k holds the indices of domain k."""
    if num_silos != len(domain_names):
        raise ValueError(
            f"--scheme domain needs --silos equal to the number of domains: got {num_silos}, "
            f"the data has {len(domain_names)} ({', '.join(domain_names)})"
        )
    return [np.flatnonzero(domains == k).astype(np.int64) for k in range(len(domain_names))]


def holdout_split(
    groups: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held-out) sorted indices; ``fraction`` of each group value is held out."""
    held: list[np.ndarray] = []
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        held.append(members[: round(fraction * len(members))])
    test = np.sort(np.concatenate(held)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(groups)), test).astype(np.int64)
    return rest, test


def check_test_fraction(fraction: float) -> None:
    """ValueError unless ``fraction`` is in [0, 1) (0: no test split)."""
    if not (isinstance(fraction, int | float) and 0.0 <= fraction < 1.0):
        raise ValueError(f"--test-fraction must be in [0, 1), got {fraction!r}")


# --------------------------------------------------------------------------- output


def _prepare_out(out: Path, root: Path, num_silos: int, folder_dataset: bool) -> None:
    """Create ``out``; drop our own leftovers from an earlier, larger partition."""
    from lssfl.dataprep.splits import DataError, remove_stale_silos

    out_r, root_r = out.resolve(), root.resolve()
    if out_r == root_r or (folder_dataset and root_r in out_r.parents):
        # Writing silo folders into an image folder would turn them into classes next time.
        raise ValueError(f"--out {out} must be outside the dataset root {root}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # A rewrite cut short must not leave a summary describing the old split.
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    remove_stale_silos(out, num_silos)


def _split_record(name: str, domain: str, y: np.ndarray, num_classes: int) -> dict[str, Any]:
    counts = np.bincount(y, minlength=num_classes).tolist()
    return {"name": name, "domain": domain, "samples": int(len(y)), "class_counts": counts}


def format_summary(summary: dict[str, Any]) -> str:
    """The per-split table (split, domain, samples, per-class counts) printed by the CLI."""
    classes: list[str] = summary["classes"]
    many = len(classes) > MAX_CLASS_COLUMNS
    show_domain = bool(summary["domains"])
    header = ["split", *(["domain"] if show_domain else []), "samples"]
    header += ["classes"] if many else [str(c) for c in range(len(classes))]
    rows = [header]
    for rec in summary["splits"]:
        row = [rec["name"], *([rec["domain"]] if show_domain else []), str(rec["samples"])]
        counts = rec["class_counts"]
        if many:
            row.append(f"{sum(1 for n in counts if n)}/{len(counts)}")
        else:
            row += [str(n) for n in counts]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    text_cols = 2 if show_domain else 1  # left-align names, right-align numbers
    lines = [
        "  ".join(
            cell.ljust(w) if i < text_cols else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    if not many and any(name != str(i) for i, name in enumerate(classes)):
        lines.append("classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(classes)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def _silo_parts(
    data: LabelledData, train: np.ndarray, scheme: str, num_silos: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Per-silo indices into ``data`` drawn from the ``train`` indices."""
    rng = np.random.default_rng([seed, 1])  # independent of the hold-out stream
    labels = data.y.numpy()[train]
    if scheme == "iid":
        parts = iid_split(len(train), num_silos, rng)
    elif scheme == "dirichlet":
        parts = dirichlet_split(labels, num_silos, alpha, rng)
    else:
        if data.domains is None:
            raise ValueError(
                "--scheme domain needs a dataset with domains (--dataset domainfolder)"
            )
        parts = domain_split(data.domains.numpy()[train], data.domain_names, num_silos)
    return [train[p] for p in parts]


def partition_dataset(
    dataset: str,
    root: Path,
    out: Path,
    silos: int,
    scheme: str = "dirichlet",
    alpha: float = 1.0,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    channels: int | None = None,
    download: bool = False,
    normalize: str | None = None,
    uint8: bool = False,
) -> dict[str, Any]:
    """Write ``out/silo-1..N``, ``out/test`` and ``out/partition.json``; return the summary.

    ``test_fraction=0`` on a dataset without its own test split writes no ``test`` (the
    silos evaluate: one hospital's images, all in ``silo-1``). ``uint8`` stores the pixels as
    uint8, a quarter of the size, which silos read per batch (normalised as they are read)."""
    import torch

    from lssfl.dataprep.datasets import has_test_split, load_dataset
    from lssfl.dataprep.splits import remove_own_split, save_split

    if scheme not in SCHEMES:
        raise ValueError(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    check_alpha(alpha, "--alpha")
    check_test_fraction(test_fraction)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    if isinstance(silos, bool) or not isinstance(silos, int) or silos < 1:
        raise ValueError(f"--silos must be a positive integer, got {silos!r}")
    name = canonical_name(dataset)
    root, out = Path(root).expanduser(), Path(out).expanduser()
    folder_dataset = name in ("imagefolder", "domainfolder")

    # uint8 keeps the pixels: the normalisation is recorded and applied when they are read.
    load: dict[str, Any] = dict(
        image_size=image_size,
        channels=channels,
        download=download,
        normalize=None if uint8 else normalize,
    )
    data = load_dataset(name, root, "train", **load)
    if scheme == "domain" and data.domains is not None:
        domain_split(data.domains.numpy(), data.domain_names, silos)  # fail before any I/O
    official_test = has_test_split(name, root)
    held_out: list[int] | None = None  # train-split indices of a held-out test split
    test: LabelledData | None = None
    if official_test:
        test = load_dataset(name, root, "test", **load)
        train_idx = np.arange(data.num_samples, dtype=np.int64)
    elif test_fraction == 0:
        train_idx = np.arange(data.num_samples, dtype=np.int64)
    else:
        groups = data.y.numpy()
        if data.domains is not None:
            groups = data.domains.numpy() * data.num_classes + groups
        train_idx, test_idx = holdout_split(groups, test_fraction, np.random.default_rng([seed, 0]))
        if len(test_idx) == 0:
            raise ValueError(f"--test-fraction {test_fraction} holds out no samples")
        test = _subset(data, test_idx)
        held_out = test_idx.tolist()
    if test is not None and len(test.classes) != data.num_classes:
        raise ValueError(
            f"{root}: the test split has {len(test.classes)} classes, train has "
            f"{data.num_classes}; they must share one label space"
        )

    parts = _silo_parts(data, train_idx, scheme, silos, alpha, seed)
    _prepare_out(out, root, silos, folder_dataset)
    common: dict[str, Any] = {"dataset": name, "seed": seed, "num_classes": data.num_classes}
    if uint8 and normalize:
        common["normalize"] = normalize
    common["classes"] = list(data.classes)
    records = []
    for k, idx in enumerate(parts):
        silo = f"silo-{k + 1}"
        domain = _silo_domain(data, idx, name)
        meta = {
            **common,
            "split": silo,
            "domain": domain,
            "scheme": scheme,
            "indices": idx.tolist(),
        }
        if scheme == "dirichlet":
            meta["alpha"] = alpha
        if domain in data.domain_names:
            meta["domain_index"] = data.domain_names.index(domain)
        t = torch.from_numpy(idx)
        save_split(out / silo, _pixels(data.x[t], uint8), data.y[t], meta)
        records.append(_split_record(silo, domain, data.y.numpy()[idx], data.num_classes))

    if test is not None:
        records.append(_write_test(out, test, common, official_test, held_out, uint8))
    else:
        remove_own_split(out / "test")  # an earlier partition's test split would mislead

    summary = {
        "dataset": name,
        "root": str(root),
        "scheme": scheme,
        "alpha": alpha if scheme == "dirichlet" else None,
        "seed": seed,
        "silos": silos,
        "test_source": "none" if test is None else ("official" if official_test else "held-out"),
        "test_fraction": None if official_test else test_fraction,
        "pixels": "uint8" if uint8 else "float32",
        "image_size": image_size,
        "channels": int(data.x.shape[1]),
        "shape": list(data.x.shape[1:]),
        "normalize": normalize,
        "classes": list(data.classes),
        "domains": list(data.domain_names),
        "splits": records,
    }
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def _pixels(x: Any, uint8: bool) -> Any:
    """``x`` (float in [0, 1]) as stored: float32, or uint8 pixels."""
    import torch

    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8) if uint8 else x


def _write_test(
    out: Path,
    test: LabelledData,
    common: dict[str, Any],
    official: bool,
    held_out: list[int] | None,
    uint8: bool,
) -> dict[str, Any]:
    """Write ``out/test``; its row of the summary."""
    from lssfl.dataprep.splits import save_split

    test_meta = {**common, "split": "test", "source": "official" if official else "held-out"}
    test_meta["domain"] = "all" if test.domain_names else common["dataset"]
    if test.domain_names:
        test_meta["domains"] = list(test.domain_names)
    if held_out is not None:
        test_meta["indices"] = held_out
    save_split(out / "test", _pixels(test.x, uint8), test.y, test_meta, domain=test.domains)
    return _split_record(
        "test", str(test_meta["domain"]), test.y.numpy(), int(common["num_classes"])
    )


def _silo_domain(data: LabelledData, idx: np.ndarray, dataset: str) -> str:
    """The silo's domain name when it has exactly one, "mixed" for several, else the dataset."""
    if data.domains is None:
        return dataset
    present = np.unique(data.domains.numpy()[idx])
    return data.domain_names[int(present[0])] if len(present) == 1 else "mixed"


def _subset(data: LabelledData, idx: np.ndarray) -> LabelledData:
    import torch

    from lssfl.dataprep.datasets import LabelledData

    t = torch.from_numpy(idx)
    domains = None if data.domains is None else data.domains[t]
    return LabelledData(data.x[t], data.y[t], data.classes, domains, data.domain_names)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``partition`` subcommand to an ``lssfl`` subparsers object; returns its parser."""
    desc = "Split a local dataset into per-silo folders (silo-1..N, test) for a federated run."
    p = subparsers.add_parser(
        "partition",
        help=desc,
        description=desc,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--root", required=True, type=Path, help="local folder holding the dataset")
    p.add_argument("--out", required=True, type=Path, help="output folder for silo-*/ and test/")
    p.add_argument("--silos", required=True, type=_positive_int, help="number of silos N")
    p.add_argument(
        "--scheme", choices=SCHEMES, default="dirichlet", help="how to deal (default dirichlet)"
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="Dirichlet concentration; smaller = more label skew (default 1.0)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="held out as test/ when the dataset has no test split (default 0.2; 0: no test/, "
        "e.g. one hospital's own images with --silos 1, evaluated at the silos)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=_positive_int, help="resize to SxS (default: native)")
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="convert to 1 or 3 channels (default: native; RGB for image folders)",
    )
    p.add_argument(
        "--normalize",
        choices=("imagenet",),
        help="store pixels normalised by the ImageNet mean/std (for pretrained ResNets)",
    )
    p.add_argument(
        "--uint8",
        action="store_true",
        help="store pixels as uint8 (a quarter of float32); silos read them per batch",
    )
    p.add_argument(
        "--download", action="store_true", help="let torchvision download it (needs internet)"
    )
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` as ``lssfl partition ARGS`` (for tests and standalone use)."""
    parser = argparse.ArgumentParser(prog="lssfl")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["partition", *argv])


def run(args: argparse.Namespace) -> int:
    """Run the ``partition`` subcommand; errors propagate as DataError/ValueError."""
    summary = partition_dataset(
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        silos=args.silos,
        scheme=args.scheme,
        alpha=args.alpha,
        test_fraction=args.test_fraction,
        seed=args.seed,
        image_size=args.image_size,
        channels=args.channels,
        download=args.download,
        normalize=args.normalize,
        uint8=args.uint8,
    )
    print(format_summary(summary))
    print(f"wrote {len(summary['splits'])} splits and {SUMMARY_FILE} to {args.out}")
    return 0
