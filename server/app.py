"""The coordinator process: data, initial model, service, rounds."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
import yaml

from lssfl.common.config import RunConfig, config_to_dict
from lssfl.common.data import load_split
from lssfl.common.dataroot import prepare_data_root
from lssfl.common.models import build_model, evaluate
from lssfl.server.coordinator import Coordinator
from lssfl.server.initial import initial_state
from lssfl.server.service import serve
from lssfl.server.store import RoundStore, atomic_write

log = logging.getLogger("lssfl.coordinator")
ADDRESS_FILE = "coordinator.addr"


def run_coordinator(cfg: RunConfig, run_dir: Path, port: int | None = None) -> int:
    """Serve one run to the end. Returns the process exit code."""
    if (run_dir / "metrics.jsonl").exists():
        log.error("run folder %s already holds a run; choose another --run-dir", run_dir)
        return 2
    store = RoundStore(run_dir)
    store.save_config(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    data = prepare_data_root(cfg)
    test = load_split(data.test_dir)
    model = build_model(cfg.model_spec)

    def evaluate_state(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        model.load_state_dict(state)
        return evaluate(model, test.x, test.y)

    coordinator = Coordinator(
        cfg, store, initial_state(cfg, data.pretrain_dir), evaluate_state, run_id=run_dir.name
    )
    server, bound = serve(
        coordinator, cfg.coordinator.host, cfg.coordinator.port if port is None else port
    )
    address = f"{cfg.coordinator.host}:{bound}"
    # The launcher waits for this file to learn the port the OS picked.
    atomic_write(run_dir / ADDRESS_FILE, address.encode())
    log.info("serving run %s on %s for silos %s", coordinator.run_id, address, ", ".join(cfg.silos))
    signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
    try:
        coordinator.run()
    except KeyboardInterrupt:
        log.warning("stopped before the end of the run; %s keeps the finished rounds", run_dir)
        return 130
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        server.stop(grace=2).wait()
    log.info("run finished: %s", run_dir)
    return 0
