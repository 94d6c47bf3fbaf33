"""After `pip install` of the wheel: `lssfl --version`, `lssfl init`, the --help examples."""

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from lssfl import __version__
from lssfl.common.config import load_config
from lssfl.training.spec import resolve_trainer
from tests.conftest import run_lssfl

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_package_version():
    proc = run_lssfl("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"lssfl {__version__}\n"
    assert version("lssfl") == __version__


def test_license_file_is_the_apache_license_pyproject_names():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_init_writes_the_configs_and_refuses_to_overwrite(tmp_path):
    proc = run_lssfl("init", "--out", str(tmp_path / "cfg"))
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in (tmp_path / "cfg").iterdir())
    assert written == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    for name in written:
        assert (tmp_path / "cfg" / name).read_text() == (ROOT / "configs" / name).read_text()
        load_config(tmp_path / "cfg" / name)  # every shipped config is valid
    edited = tmp_path / "cfg" / "run.yaml"
    edited.write_text("# mine\n")
    again = run_lssfl("init", "--out", str(tmp_path / "cfg"))
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "exists; --force replaces it" in again.stderr and edited.read_text() == "# mine\n"
    forced = run_lssfl("init", "--out", str(tmp_path / "cfg"), "--force")
    assert forced.returncode == 0 and edited.read_text().startswith("# A run on separate")


def test_commented_config_is_for_separate_machines():
    # The trainer's keys are typed by the trainer, as `lssfl run` does.
    cfg = resolve_trainer(load_config(ROOT / "configs" / "run.yaml"))
    assert cfg.coordinator.host == "0.0.0.0" and cfg.coordinator.port == 50051
    assert cfg.security.tls and cfg.security.tokens and cfg.model.init == "random"
    assert isinstance(cfg.trainer["lr"], float)  # written `3e-3`, a string to PyYAML
    assert (ROOT / "configs" / "run.yaml").read_text().count("#") > 20


def _wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of what pyproject packages (no clutter in the clone)."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject's build requirement
        pytest.skip(f"setuptools {setuptools.__version__} < 77 here: cannot build offline")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    src = tmp_path / "src"
    for folder in pyproject["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "wheels"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("lssfl-*.whl")
    return wheel


def test_wheel_in_a_fresh_venv_runs_init_and_the_help_examples(tmp_path):
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {f"lssfl/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # A venv holding only the wheel; its dependencies (torch...) come from this interpreter's
    # site-packages through a .pth line, which does not bring this clone's editable install.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = venv.glob("lib/python*/site-packages")
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "work"
    work.mkdir()

    def lssfl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(venv / "bin" / "lssfl"), *args], capture_output=True, text=True, cwd=work,
            timeout=120,
        )  # fmt: skip

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import lssfl; print(lssfl.__file__)"],
        capture_output=True, text=True, cwd=work, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(purelib)), where.stdout  # the wheel, not the clone
    before = lssfl("config", "show", "--config", "configs/demo.yaml")
    assert before.returncode == 2 and "`lssfl init` writes example configs" in before.stderr
    init = lssfl("init")
    assert init.returncode == 0, init.stderr
    assert "lssfl run --config configs/demo.yaml" in init.stdout
    shown = lssfl("config", "show", "--config", "configs/demo.yaml")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["run"]["name"] == "demo-fedavg"
    assert lssfl("--version").stdout == f"lssfl {__version__}\n"
    certs = lssfl("certs", "--out", "certs", "--config", "configs/run.yaml")
    assert certs.returncode == 0, certs.stderr
    assert (work / "certs" / "silo-2.token").is_file()
