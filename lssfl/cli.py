"""The ``lssfl`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lssfl import __version__

# After `pip install`, `lssfl init` writes the configs these examples name.
EXAMPLES = {
    "init": (
        "example:\n  lssfl init   # configs/: run.yaml (commented, separate machines) and the demos"
    ),
    "run": "Ctrl-C or SIGTERM stops every process (exit 130 / 143); the same --run-dir resumes."
    "\n\nexample:\n  lssfl init && lssfl run --config configs/demo.yaml",
    "coordinator": (
        "example:\n  lssfl coordinator --config configs/demo.yaml --run-dir runs/hospital-a"
    ),
    "certs": (
        "examples:\n  lssfl certs --out certs --silos silo-1 silo-2 --hosts fl.example.org\n"
        "  lssfl certs --out certs --config configs/run.yaml --hosts fl.example.org localhost\n"
        "  lssfl certs add-silo silo-3 --out certs   # the others' files stay valid\n"
        "  lssfl certs revoke silo-2 --out certs     # a running coordinator refuses it"
    ),
    "config": "example:\n  lssfl config show --config configs/demo.yaml",
    "prepare": "example:\n  lssfl prepare --config configs/demo.yaml",
    "health": (
        "examples:\n  lssfl health localhost:50051\n"
        "  lssfl health localhost:50051 --ca certs/ca.pem\n"
        "  lssfl health localhost:50051 --ca certs/ca.pem --cert certs/silo-1.pem "
        "--key certs/silo-1.key"
    ),
    "status": "example:\n  lssfl status runs/study-1",
    "silo": (
        "example:\n  lssfl silo --coordinator 10.0.0.5:50051 --silo-id silo-1 --data /data/silo-1"
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lssfl", description="Cross-silo federated learning with Local Superior Soups."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"lssfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    run = add("run", "Run a coordinator and all silos as local processes, then report.")
    run.add_argument("--config", required=True, type=Path, help="run config (YAML)")
    run.add_argument("--run-dir", type=Path, help="default: <run.out_dir>/<run.name>-<time>")

    coord = add("coordinator", "Serve a federated run to the silos named in the config.")
    coord.add_argument("--config", required=True, type=Path, help="run config (YAML)")
    coord.add_argument("--run-dir", type=Path, help="default: <run.out_dir>/<run.name>")
    coord.add_argument("--port", type=int, help="override coordinator.port (0: any free port)")

    silo = add("silo", "Join a coordinator and train on this silo's private data.")
    silo.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    silo.add_argument("--silo-id", required=True, help="this silo's enrolled id")
    silo.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a split folder (data.safetensors: float32 in memory, uint8 read per batch) or an "
        "image folder DIR/<class>/*.png|jpg (or DIR/train/ and DIR/test/), decoded per batch",
    )
    silo.add_argument(
        "--classes",
        type=Path,
        help="image folder: the class list, one name per line, the same file on every silo "
        "(default: DATA/classes.txt)",
    )
    silo.add_argument(
        "--resize",
        type=int,
        default=256,
        help="image folder: shorter side to (default 256; 0: keep)",
    )
    silo.add_argument(
        "--crop", type=int, default=224, help="image folder: center crop (default 224; 0: none)"
    )
    silo.add_argument(
        "--normalize",
        choices=("imagenet", "none"),
        default="imagenet",
        help="image folder: normalise with the ImageNet mean/std (default) or not",
    )
    silo.add_argument(
        "--workers", type=int, default=4, help="image folder: decoding threads (default 4)"
    )
    silo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    silo.add_argument("--ca", type=Path, help="CA certificate: connect with TLS")
    silo.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    silo.add_argument("--key", type=Path, help="client private key (mutual TLS)")
    silo.add_argument(
        "--token-file", type=Path, help="file holding this silo's bearer token (lssfl certs)"
    )
    silo.add_argument(
        "--allow-plugin",
        action="append",
        default=[],
        metavar="MODULE:NAME",
        help="a model or trainer import path a task may name (repeat for several); a task "
        "naming any other import path ends the silo with an error",
    )
    silo.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="give up after the coordinator has been unreachable this many seconds (default 300)",
    )
    silo.add_argument(
        "--max-epochs",
        type=int,
        default=1000,
        help="refuse tasks asking for more local epochs than this (default 1000)",
    )
    silo.add_argument(
        "--max-model-mb",
        type=float,
        default=4096.0,
        help="refuse models larger than this many MB (default 4096)",
    )
    certs = add(
        "certs",
        "Make a demo CA, a coordinator certificate, per-silo certificates and tokens; "
        "enrol or revoke a silo later.",
    )
    certs.add_argument(
        "action", nargs="?", default="new", choices=["new", "add-silo", "revoke"],
        help="new (default): a new CA and every file; add-silo ID: one more silo with the "
        "same CA; revoke ID: refuse a silo (revoked.txt)",
    )  # fmt: skip
    certs.add_argument("ids", nargs="*", metavar="ID", help="silo ids for add-silo / revoke")
    certs.add_argument(
        "--out", type=Path, default=Path("certs"), help="the folder (security.dir; default certs)"
    )
    who = certs.add_mutually_exclusive_group()
    who.add_argument("--silos", nargs="+", help="silo ids (new)")
    who.add_argument("--config", type=Path, help="take the silo ids from this run config (new)")
    certs.add_argument(
        "--hosts", nargs="+", default=["localhost", "127.0.0.1"],
        help="names and addresses silos dial (default: localhost 127.0.0.1)",
    )  # fmt: skip
    certs.add_argument("--force", action="store_true", help="replace existing files")
    init = add("init", "Write a commented run config and the example configs to start from.")
    init.add_argument("--out", type=Path, default=Path("configs"), help="default: configs")
    init.add_argument("--force", action="store_true", help="replace existing files")
    conf = add("config", "Inspect a run config.")
    conf.add_argument(
        "action", choices=["show"], help="show: the effective config, defaults filled"
    )
    conf.add_argument("--config", required=True, type=Path, help="run config (YAML)")

    prep = add("prepare", "Generate the embedded data of a config and show what each silo holds.")
    prep.add_argument("--config", required=True, type=Path, help="run config (YAML)")

    hc = add("health", "Ask a coordinator's gRPC health service; exit 0 when it is serving.")
    hc.add_argument("address", help="HOST:PORT")
    hc.add_argument("--ca", type=Path, help="CA certificate when the coordinator uses TLS")
    hc.add_argument("--cert", type=Path, help="a client certificate, with mutual TLS")
    hc.add_argument("--key", type=Path, help="its private key")
    hc.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")

    status = add("status", "Where a run stands (round, phase, silos, bytes), read-only.")
    status.add_argument("run_dir", type=Path, help="the coordinator's run folder")

    from lssfl.partition import register as register_partition
    from lssfl.report.command import register as register_report

    register_partition(sub)
    register_report(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``lssfl`` command line; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command != "coordinator":  # the coordinator routes core's log (server/corelog.py)
        # gRPC core logs a failed TLS handshake raw, at info level; we say it in one line.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # Imports after parsing: `--help` answers without loading torch.
    # ConfigError, DataError, WireError and CodecError are ValueErrors: one line each, below.
    from lssfl.common.config import load_config
    from lssfl.common.logs import setup_logging

    try:
        if args.command == "silo":
            from lssfl.dataprep.silodata import ImageTransform
            from lssfl.silo.daemon import CoordinatorUnreachable, SiloDaemon, SiloRefused

            setup_logging("silo", args.verbose)  # each line names the silo: silo=ID
            try:
                daemon = SiloDaemon.from_folder(
                    args.coordinator,
                    args.silo_id,
                    args.data,
                    device=args.device,
                    max_wait_s=args.max_wait,
                    ca=args.ca,
                    cert=args.cert,
                    key=args.key,
                    token_file=args.token_file,
                    max_epochs=args.max_epochs,
                    max_model_mb=args.max_model_mb,
                    classes=args.classes,
                    transform=ImageTransform(
                        args.resize or None,
                        args.crop or None,
                        None if args.normalize == "none" else args.normalize,
                    ),
                    workers=args.workers,
                    allowed_plugins=args.allow_plugin,
                )
                daemon.run()
            except SiloRefused as exc:
                return _fail(f"the coordinator refused silo {args.silo_id!r}: {exc}")
            except CoordinatorUnreachable as exc:
                return _fail(str(exc), code=1)
            return 0

        if args.command == "partition":
            from lssfl.partition import run

            setup_logging("partition", args.verbose)
            return run(args)
        if args.command == "report":
            from lssfl.report.command import run as report_run

            return report_run(args)
        if args.command == "status":
            from lssfl.status import describe

            print(describe(args.run_dir))
            return 0
        if args.command == "health":
            return _health(args.address, args.ca, args.cert, args.key, args.timeout)
        if args.command == "certs":
            return _certs(args)
        if args.command == "init":
            return _init(args.out, args.force)
        from lssfl.dataprep.embedded import check_data_section
        from lssfl.training.spec import effective_config, resolve_trainer

        cfg = load_config(args.config)
        # Once, here: common knows neither the data layer's sections nor the trainers'
        # parameters; the coordinator sends what this resolves and records.
        check_data_section(cfg)
        cfg = resolve_trainer(cfg)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(effective_config(cfg), sort_keys=False), end="")
            return 0
        if args.command == "prepare":
            from lssfl.dataprep.dataroot import prepare_data_root
            from lssfl.dataprep.embedded import describe as describe_data

            data = prepare_data_root(cfg)
            if cfg.data.kind == "embedded":
                print(describe_data(Path(cfg.data.root)))
            for silo, folder in data.silo_dirs.items():
                print(f"{silo}: {folder}")
            return 0
        if args.command == "coordinator":
            from lssfl.server.corelog import route_core_log

            setup_logging("coordinator", args.verbose)
            run_dir = args.run_dir or Path(cfg.run.out_dir) / cfg.run.name
            route_core_log(logging.getLogger("lssfl.service"))  # before gRPC starts
            from lssfl.report import write_report
            from lssfl.server.app import run_coordinator

            code = run_coordinator(cfg, run_dir, args.port)
            if code != 2:  # 2: the folder holds another run, left as it was
                print(f"report: {write_report(run_dir)}", file=sys.stderr)
            return code
        from lssfl.launcher import launch

        return launch(cfg, args.config, args.run_dir)
    except ValueError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def _certs(args: argparse.Namespace) -> int:
    from lssfl.common.config import load_config
    from lssfl.common.security import CA_CERT, add_silo, make_certs, revoke_silo, silo_files

    out: Path = args.out
    if args.action == "new":
        if args.ids:
            return _fail(f"certs: unexpected {args.ids[0]!r} (add-silo ID or revoke ID?)")
        if not (args.silos or args.config):
            return _fail("certs: give the silo ids with --silos or --config")
        silos = args.silos or load_config(args.config).silos
        make_certs(out, silos, args.hosts, force=args.force)
        print(
            f"wrote a CA (ca.pem, ca.key), a coordinator certificate for {', '.join(args.hosts)} "
            f"and {len(silos)} silo certificates and tokens to {out}"
        )
        return 0
    if not args.ids:
        return _fail(f"certs {args.action}: name the silo id(s)")
    if args.silos or args.config:
        return _fail(f"certs {args.action}: takes the silo ids as arguments, not --silos/--config")
    for silo in args.ids:
        if args.action == "add-silo":
            add_silo(out, silo, force=args.force)
            names = ", ".join(p.name for p in silo_files(out, silo))
            print(f"added {silo}: {names} in {out}; the silo needs those and {CA_CERT}")
        else:
            revoke_silo(out, silo)
            print(f"revoked {silo} in {out}/revoked.txt; a running coordinator refuses it")
    return 0


def _init(out: Path, force: bool) -> int:
    from importlib.resources import files

    shipped = sorted(
        (f for f in files("lssfl.configs").iterdir() if f.name.endswith(".yaml")),
        key=lambda f: (f.name != "run.yaml", f.name),
    )
    existing = [out / f.name for f in shipped if (out / f.name).exists()]
    if existing and not force:
        return _fail(f"{existing[0]} exists; --force replaces it")
    out.mkdir(parents=True, exist_ok=True)
    for f in shipped:
        (out / f.name).write_text(f.read_text())
    print(f"wrote {', '.join(str(out / f.name) for f in shipped)}")
    print(f"{out / 'run.yaml'}: a commented config for separate machines; try the demo with")
    print(f"  lssfl run --config {out / 'demo.yaml'}")
    return 0


def _health(
    address: str, ca: Path | None, cert: Path | None, key: Path | None, timeout: float
) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lssfl.common.rpc import SERVICE
    from lssfl.common.security import channel_credentials
    from lssfl.common.tls_errors import explain_connect_failure

    creds = channel_credentials(ca, cert, key)
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout
        )
    except grpc.RpcError as exc:
        problem = explain_connect_failure(address, exc.details() or "", ca, cert, key)
        if problem:
            return _fail(problem)
        return _fail(f"{address}: {exc.code().name}: {exc.details()}", code=1)
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


def _fail(message: str, code: int = 2) -> int:
    print(f"lssfl: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
