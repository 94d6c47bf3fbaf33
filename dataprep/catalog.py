"""The datasets ``lssfl partition`` reads, by name: torch-free, so ``--help`` lists them
without loading the readers (lssfl.dataprep.datasets)."""

from __future__ import annotations

_ALIASES = {
    "mnist": "mnist",
    "fashionmnist": "fashionmnist",
    "fashion-mnist": "fashionmnist",
    "fmnist": "fashionmnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "svhn": "svhn",
    "usps": "usps",
    "imagefolder": "imagefolder",
    "folder": "imagefolder",
    "domainfolder": "domainfolder",
    "domains": "domainfolder",
}
DATASETS: tuple[str, ...] = (
    "mnist",
    "fashionmnist",
    "cifar10",
    "svhn",
    "usps",
    "imagefolder",
    "domainfolder",
)


def canonical_name(name: str) -> str:
    """The canonical dataset name for ``name`` or an alias; ValueError if unknown."""
    key = name.strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _ALIASES[key]
