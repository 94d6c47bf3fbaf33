"""The container demo in deploy/ without a Docker engine: its files.

The compose file, the Dockerfile and .dockerignore are read as Docker reads them and checked
against each other and the package (volumes per silo, health checks, the entry point, the
wheel). tests/test_compose_run.py runs the services themselves, with the readers here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

# Real OS processes, gRPC over sockets: minutes on 2 cores (`pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# --------------------------------------------------------------------------- reading the files


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@dataclass
class Image:
    """What deploy/Dockerfile puts in the image, as far as running it is concerned."""

    args: dict[str, str] = field(default_factory=dict)
    base: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = "root"
    # (source in the build context, destination in the image), destinations made absolute
    copies: list[tuple[str, str]] = field(default_factory=list)
    # (workdir, command) of every RUN
    runs: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue  # comments and blank lines, also inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def read_image() -> Image:
    img = Image()
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "ARG":
            name, _, default = rest.partition("=")
            img.args[name] = default
        elif word == "FROM":
            img.base = re.sub(r"\$\{(\w+)\}", lambda m: img.args[m.group(1)], rest)
        elif word == "WORKDIR":
            img.workdir = str(Path(img.workdir, rest))
        elif word == "USER":
            img.user = rest
        elif word in ("ENTRYPOINT", "CMD"):
            setattr(img, word.lower(), json.loads(rest))
        elif word == "COPY":
            *sources, dest = rest.split()
            for src in sources:
                img.copies.append((src.rstrip("/"), str(Path(img.workdir, dest))))
        elif word == "RUN":
            img.runs.append((img.workdir, rest))
    return img


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out of the build.

    Docker's rules for the patterns used here: the last matching pattern wins, `!` re-admits,
    `*` stays within one path element, `**` spans any number, and a pattern that matches a
    folder covers everything below it.
    """
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pat):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def named_volumes(service: dict) -> list[tuple[str, str, bool]]:
    """(volume name, container path, read-only) of the service's named volumes."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            source, target = entry.get("source", ""), entry["target"]
            read_only = bool(entry.get("read_only"))
        else:
            source, target, *mode = entry.split(":")
            read_only = mode == ["ro"]
        assert source and not source.startswith((".", "/", "~")), f"not a named volume: {entry}"
        out.append((source, target, read_only))
    return out


def argv_of(service: dict, image: Image) -> list[str]:
    """The container's command line: entrypoint + command, as Docker assembles them."""
    entrypoint = service.get("entrypoint", image.entrypoint)
    command = service.get("command", image.cmd if "entrypoint" not in service else [])
    as_list = [shlex.split(x) if isinstance(x, str) else list(x) for x in (entrypoint, command)]
    return as_list[0] + as_list[1]


def depends_on(service: dict) -> dict[str, dict]:
    """depends_on in its long form (the short form is a list of names: service_started)."""
    deps = service.get("depends_on", {})
    return {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def silo_services(compose: dict) -> dict[str, dict]:
    image = read_image()
    return {
        name: svc
        for name, svc in compose["services"].items()
        if argv_of(svc, image)[:2] == ["lssfl", "silo"]
    }


def container_port(compose: dict) -> int:
    (port,) = compose["services"]["coordinator"]["ports"]
    return int(str(port).split(":")[-1])


# --------------------------------------------------------------------------- structure


def test_each_silo_mounts_only_its_own_data_volume():
    compose = load_compose()
    image = read_image()
    services = compose["services"]
    silos = silo_services(compose)
    cfg = yaml.safe_load((ROOT / "configs" / "compose.yaml").read_text())
    argvs = {name: argv_of(svc, image) for name, svc in silos.items()}
    assert sorted(option(a, "--silo-id") for a in argvs.values()) == sorted(cfg["silos"])

    owners: dict[str, set[str]] = {}
    for name, svc in services.items():
        for volume, _, _ in named_volumes(svc):
            owners.setdefault(volume, set()).add(name)
    for name, argv in argvs.items():
        silo_id = option(argv, "--silo-id")
        (mount,) = named_volumes(silos[name])  # one volume: its data, nothing else
        volume, target, read_only = mount
        assert option(argv, "--data") == target and read_only
        assert volume == f"{silo_id}-data" and volume in compose["volumes"]
        # Besides the silo, only its own data job ever mounts the volume.
        others = owners[volume] - {name}
        assert len(others) == 1, owners[volume]
        (job,) = others
        assert named_volumes(services[job]) == [(volume, "/data", False)]
        assert f"/{silo_id}/. /data/" in " ".join(argv_of(services[job], image))
        assert services[name]["depends_on"][job] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["coordinator"] == {"condition": "service_healthy"}
        host, port = option(argv, "--coordinator").split(":")
        assert host == "coordinator" and int(port) == container_port(compose)
    # The coordinator mounts no silo's volume.
    coordinator_volumes = {v for v, _, _ in named_volumes(services["coordinator"])}
    assert not coordinator_volumes & {f"{s}-data" for s in cfg["silos"]}


def test_coordinator_service_run_folder_volume_health_check_and_restart_policy():
    compose = load_compose()
    image = read_image()
    coord = compose["services"]["coordinator"]
    argv = argv_of(coord, image)
    assert argv[:2] == ["lssfl", "coordinator"]
    port = container_port(compose)
    assert option(argv, "--port") == str(port)
    mounts = {target: (volume, ro) for volume, target, ro in named_volumes(coord)}
    run_dir = option(argv, "--run-dir")
    # The run folder is on a named, writable volume: it outlives the container.
    (runs_target,) = [t for t in mounts if run_dir.startswith(t + "/")]
    assert not mounts[runs_target][1] and mounts[runs_target][0] in compose["volumes"]
    # The config ships in the image and points at the mounted folders.
    config = option(argv, "--config")
    assert config.startswith("/app/configs/")
    from lssfl.common.config import load_config

    cfg = load_config(ROOT / "configs" / Path(config).name)
    assert cfg.data.kind == "folders" and cfg.data.root in mounts and mounts[cfg.data.root][1]
    assert cfg.run.out_dir == runs_target and cfg.coordinator.host == "0.0.0.0"
    assert coord["healthcheck"]["test"] == ["CMD", "lssfl", "health", f"localhost:{port}"]
    # A finished run exits 0; `always` or `unless-stopped` would start it again and again.
    assert coord["restart"].split(":")[0] in ("on-failure", "no")
    assert coord["depends_on"] == {
        "data-coordinator": {"condition": "service_completed_successfully"}
    }


def test_dockerfile_installs_the_readme_package_with_the_same_entry_point_and_configs():
    image = read_image()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert image.base == "python:3.11-slim" and "TORCH_INDEX" in image.args
    assert image.args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/")
    # The README's `lssfl` console script is the entry point of every container.
    assert pyproject["project"]["scripts"] == {"lssfl": "lssfl.cli:main"}
    assert image.entrypoint == ["lssfl"]
    assert image.user not in ("root", "0") and image.workdir == "/app"
    # Same demo config: configs/ lands in /app/configs, so `lssfl run --config
    # configs/demo.yaml` (the README's `make demo`) works in the image's working folder.
    assert ("configs", "/app/configs") in image.copies
    assert (ROOT / "configs" / "demo.yaml").is_file()

    # `pip install .` runs where pyproject.toml and every folder it maps were copied.
    (build,) = [wd for wd, cmd in image.runs if re.search(r"pip install \.(\s|$)", cmd)]
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    sources = ["pyproject.toml", "README.md", *package_dir.values()]
    for src in sources:
        dest = build if (ROOT / src).is_file() else f"{build}/{src}"
        assert (src, dest) in image.copies, f"{src} is not copied to {dest}"

    # The build context after .dockerignore holds every file of those sources, and not the
    # local clutter (virtualenv, data, runs, git).
    def context_files(src: str) -> list[Path]:
        path = ROOT / src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return [p for p in files if "__pycache__" not in p.parts]

    for src in [*sources, "configs"]:
        for file in context_files(src):
            rel = file.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(rel), f".dockerignore drops {rel}"
    for clutter in (
        ".venv/bin/python",
        "data/embedded/manifest.json",
        "runs/x/metrics.jsonl",
        ".git/HEAD",
        "lssfl/__pycache__/cli.cpython-311.pyc",
        "tests/test_e2e.py",
    ):
        assert dockerignore_excludes(clutter), clutter


def test_dockerfile_build_context_makes_the_lssfl_wheel(tmp_path):
    """`pip install .` as the image runs it, on the files the COPY lines put in place."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject's build requirement
        pytest.skip(f"setuptools {setuptools.__version__} < 77 here: cannot build offline")
    image = read_image()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    (build,) = [wd for wd, cmd in image.runs if re.search(r"pip install \.(\s|$)", cmd)]
    context = tmp_path / "build"
    for src, dest in image.copies:
        if dest.startswith(build):
            target = context / Path(dest).relative_to(build)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target / src)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(wheels), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheels.glob("lssfl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "lssfl = lssfl.cli:main" in zf.read(entry_points).decode()
    for package, folder in package_dir.items():
        for module in (ROOT / folder).glob("*.py"):
            assert f"{package.replace('.', '/')}/{module.name}" in names


def _compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_file_validates_with_docker_compose_config():
    tool = _compose_tool()
    if tool is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    # `config` parses, interpolates and validates the file; it needs no Docker engine.
    proc = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
