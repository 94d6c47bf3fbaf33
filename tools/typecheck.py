"""Type-check the ``lssfl`` package with mypy (settings: ``[tool.mypy]`` in pyproject.toml).

The package is assembled from the role folders (``[tool.setuptools.package-dir]``), which mypy
cannot follow, so this script mirrors that mapping as symlinks under ``.mypy_cache/tree``
and checks ``-p lssfl`` there; reported paths are mapped back to the repository's. Exit code:
mypy's (0 when clean).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".mypy_cache"
TREE = CACHE / "tree"


def build_tree() -> dict[str, str]:
    """Symlink each package folder at its import path; returns tree prefix -> repo folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    (TREE / "lssfl").mkdir(parents=True)
    top = ROOT / package_dir["lssfl"]
    for entry in top.iterdir():
        if entry.suffix == ".py" or (entry / "__init__.py").is_file():
            (TREE / "lssfl" / entry.name).symlink_to(entry)
    prefixes = {"lssfl/": f"{package_dir['lssfl']}/"}
    for package, folder in package_dir.items():
        if package != "lssfl":
            sub = package.split(".", 1)[1]
            (TREE / "lssfl" / sub).symlink_to(ROOT / folder, target_is_directory=True)
            prefixes[f"lssfl/{sub}/"] = f"{folder}/"
    return prefixes


def main() -> int:
    prefixes = build_tree()
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(CACHE), "-p", "lssfl"],
        cwd=TREE, capture_output=True, text=True,
    )  # fmt: skip
    # Longest prefix first: lssfl/common/ before lssfl/.
    pattern = re.compile("|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True)))
    for line in (proc.stdout + proc.stderr).splitlines():
        print(pattern.sub(lambda m: prefixes[m.group(0)], line, count=1) if line else line)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
