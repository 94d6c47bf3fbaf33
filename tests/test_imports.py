"""Imports run one way: every module's imports, function-level ones included, checked by layer.

Layers, by source folder: ``common/`` (lssfl.common) knows no role; ``training/``
(lssfl.training, the local trainers both roles use) imports only common; ``dataprep/``
(lssfl.dataprep: datasets, the embedded digits, split folders, a silo's data) imports only
common, and neither common nor training imports it; ``server/`` and ``silo/`` never import
each other; none of them imports the command-line layer in ``lssfl/`` (cli, launcher, report,
partition, status), which sits on top and may import anything. ``stubs/`` (lssfl.proto,
generated) imports none of ours.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"common": "common", "training": "training", "dataprep": "dataprep",
           "server": "server", "silo": "silo", "proto": "stubs", "cli": "lssfl"}  # fmt: skip
PACKAGES = {"common", "training", "dataprep", "server", "silo", "proto"}
FORBIDDEN = {
    "common": {"training", "dataprep", "server", "silo", "cli"},
    "training": {"dataprep", "server", "silo", "cli"},
    "dataprep": {"training", "server", "silo", "cli"},
    "server": {"silo", "cli"},
    "silo": {"server", "cli"},
    "proto": {"common", "training", "dataprep", "server", "silo", "cli"},
    "cli": set(),
}


def layer_of(module: str) -> str | None:
    """The layer of a dotted lssfl module name; None for other packages and for the package
    root ``lssfl`` itself (it holds only ``__version__``)."""
    parts = module.split(".")
    if parts[0] != "lssfl" or len(parts) == 1 or parts[1].startswith("__"):
        return None
    return parts[1] if parts[1] in PACKAGES else "cli"


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file, at any depth; relative imports
    resolved against ``package``; ``from lssfl import x`` yields ``lssfl.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def forbidden_imports(root: Path) -> list[str]:
    """'path:line: layer imports module' for each import against the direction rule."""
    problems = []
    for layer, folder in FOLDERS.items():
        package = "lssfl" if layer == "cli" else f"lssfl.{layer}"
        for path in sorted((root / folder).rglob("*.py")):
            sub = path.relative_to(root / folder).with_suffix("").parts
            here = ".".join([package, *sub[:-1]])
            for line, module in imported_modules(path, here):
                if layer_of(module) in FORBIDDEN[layer]:
                    rel = path.relative_to(root)
                    problems.append(f"{rel}:{line}: {layer} imports {module}")
    return problems


def test_the_repository_imports_one_way() -> None:
    assert forbidden_imports(ROOT) == []


@pytest.mark.parametrize(
    ("folder", "source", "expected"),
    [
        ("common", "def f():\n    from lssfl.training.trainers import make_trainer\n",
         "common/x.py:2: common imports lssfl.training.trainers.make_trainer"),
        ("silo", "import lssfl.server.app\n", "silo/x.py:1: silo imports lssfl.server.app"),
        ("server", "from lssfl import silo\n", "server/x.py:1: server imports lssfl.silo"),
        ("training", "from ..server import store\n",
         "training/x.py:1: training imports lssfl.server.store"),
        ("common", "from lssfl.report.runs import read_metrics\n",
         "common/x.py:1: common imports lssfl.report.runs.read_metrics"),
        ("common", "from lssfl.dataprep.embedded import check_domains\n",
         "common/x.py:1: common imports lssfl.dataprep.embedded.check_domains"),
        ("training", "from lssfl.dataprep import splits\n",
         "training/x.py:1: training imports lssfl.dataprep.splits"),
        ("dataprep", "from lssfl.server.pretrained import pretrained_model\n",
         "dataprep/x.py:1: dataprep imports lssfl.server.pretrained.pretrained_model"),
        ("dataprep", "def f():\n    from lssfl.partition import run\n",
         "dataprep/x.py:2: dataprep imports lssfl.partition.run"),
    ],
)  # fmt: skip
def test_a_forbidden_import_is_reported(tmp_path: Path, folder: str, source: str, expected: str):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "x.py").write_text(source)
    assert forbidden_imports(tmp_path) == [expected]


def test_allowed_directions_pass(tmp_path: Path) -> None:
    allowed = {
        "common": "from lssfl.proto import coordinator_pb2\nfrom lssfl import __version__\n",
        "training": "from lssfl.common.progress import progress\n",
        "dataprep": "from lssfl.common.config import ConfigError\nfrom . import splits\n",
        "server": "from lssfl.training import trainers\nfrom ..dataprep import splits\n",
        "silo": "import torch\nfrom lssfl.common import wire\n",
        "lssfl": "from lssfl.server.app import run_coordinator\nfrom lssfl.silo import daemon\n",
    }
    for folder, source in allowed.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.py").write_text(source)
    assert forbidden_imports(tmp_path) == []
