"""Regenerate the gRPC stubs in stubs/ from proto/ (``--check``: fail if they are stale)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
STUBS = ROOT / "stubs"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    # Sources live under proto/lssfl/proto/, so the stubs import as lssfl.proto.*
    return sorted((out / "lssfl" / "proto").iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, change nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp)) if p.name.endswith(GENERATED_SUFFIXES)}
        committed = {p.name for p in STUBS.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        if args.check:
            stale = sorted(
                n
                for n in fresh
                if n not in committed or not filecmp.cmp(fresh[n], STUBS / n, False)
            )
            extra = sorted(committed - fresh.keys())
            if stale or extra:
                sys.exit(f"stubs/ is stale ({', '.join(stale + extra)}): run `make proto`")
            print(f"stubs/ up to date ({len(fresh)} files)")
            return
        for name in committed - fresh.keys():
            (STUBS / name).unlink()
        for name, path in fresh.items():
            shutil.copyfile(path, STUBS / name)
        print(f"wrote {len(fresh)} files to {STUBS.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
