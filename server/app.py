"""The coordinator process: data, initial model, service, rounds."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from lssfl.common.config import ConfigError, RunConfig
from lssfl.common.files import atomic_write
from lssfl.common.logs import also_log_to, one_line
from lssfl.common.models import build_model, evaluate, head_linear
from lssfl.common.runfolder import ADDRESS_FILE
from lssfl.dataprep.dataroot import prepare_data_root, with_evaluation_resolved
from lssfl.dataprep.embedded import check_data_section
from lssfl.dataprep.splits import Split, load_split
from lssfl.server.coordinator import Coordinator, DataSpec
from lssfl.server.initial import initial_state
from lssfl.server.prometheus import serve_metrics
from lssfl.server.service import serve
from lssfl.server.store import RoundStore, StoreError
from lssfl.server.tensorboard import TensorBoardLog
from lssfl.training.spec import effective_config, trainer_warnings

log = logging.getLogger("lssfl.coordinator")


def run_coordinator(cfg: RunConfig, run_dir: Path, port: int | None = None) -> int:
    """Serve one run to the end. Returns the process exit code. ``cfg``: resolved
    (lssfl.training.spec.resolve_trainer), so that the trainer spec the coordinator sends
    the silos is the one config.yaml and the run identity record."""
    try:
        check_data_section(cfg)
        cfg = with_evaluation_resolved(cfg)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        store = RoundStore(run_dir)
    except StoreError as exc:
        log.error("%s", exc)
        return 2
    try:
        return _serve_run(cfg, store, run_dir, port)
    finally:
        store.close()


def _serve_run(cfg: RunConfig, store: RoundStore, run_dir: Path, port: int | None) -> int:
    data = prepare_data_root(cfg)
    # One model and one read of the test split serve the checks below and the evaluation.
    model = build_model(cfg.model_spec)
    test = load_split(data.test_dir) if data.test_dir.is_dir() else None
    data_spec = _data_spec(model, test)
    problem = _model_problem(model, cfg.model.name, data_spec)
    if problem:  # before the folder records this config: a corrected one may use it
        log.error("%s", problem)
        return 2
    identity = json.dumps(run_identity(cfg), sort_keys=True)
    stored = store.get("identity")
    if stored is None:
        store.put(run_id=run_dir.name, identity=identity)
    elif stored != identity:
        changes = _differences(json.loads(stored), json.loads(identity))
        log.error(
            "run folder %s holds a run with a different config (%s); resuming it would mix "
            "two experiments: restore the config or choose another --run-dir",
            run_dir,
            "; ".join(changes[:5]),
        )
        return 2
    try:
        store.records()  # a round written by another version: refused before anything is written
    except StoreError as exc:
        log.error("%s", exc)
        return 2
    store.save_config(yaml.safe_dump(effective_config(cfg), sort_keys=False))
    # Only now: a folder refused above is left exactly as it was.
    also_log_to(run_dir / "logs" / "coordinator.log")
    for line in trainer_warnings(cfg):
        log.warning("%s", line)
    board = TensorBoardLog(run_dir) if cfg.run.tensorboard else None
    coordinator = Coordinator(
        cfg,
        store,
        initial_state(cfg, data.pretrain_dir),
        None
        if cfg.evaluation.where == "silos"
        else _test_evaluator(model, test or load_split(data.test_dir)),  # no folder: DataError
        run_id=store.get("run_id"),
        data_spec=data_spec,
        on_round=board.add if board else None,
    )
    del test  # the evaluator keeps it when it needs it; a run evaluated at the silos does not
    metrics_server = None
    try:
        if cfg.coordinator.prometheus_port is not None:
            metrics_server, metrics_port = serve_metrics(
                coordinator, cfg.coordinator.host, cfg.coordinator.prometheus_port
            )
            log.info(
                "prometheus metrics on http://%s:%d/metrics", cfg.coordinator.host, metrics_port
            )
        server, bound = serve(
            coordinator, cfg.coordinator.host, cfg.coordinator.port if port is None else port
        )
    except OSError as exc:
        log.error("%s", exc)
        if metrics_server is not None:
            metrics_server.shutdown()
        return 2
    address = f"{cfg.coordinator.host}:{bound}"
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
        if metrics_server is not None:
            metrics_server.shutdown()
        if board is not None:
            board.close()
    log.info("run finished: %s", run_dir)
    return 0


def _data_spec(model: torch.nn.Module, test: Split | None) -> DataSpec | None:
    """What a silo's data must look like, checked at Join: one sample's shape (as the test
    split's; None without one) and the classes the model predicts (its last nn.Linear's
    outputs; 0, unchecked, for a site's model without one)."""
    if test is None:
        return None
    try:
        classes = head_linear(model)[1].out_features
    except ValueError:
        classes = 0
    return tuple(test.x.shape[1:]), classes


def _model_problem(model: torch.nn.Module, name: str, spec: DataSpec | None) -> str | None:
    """Why the configured model cannot take this run's samples (one zero sample through it,
    before any pre-training or serving), or None; unchecked without a sample shape."""
    if spec is None:
        return None
    shape = list(spec[0])
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except Exception as exc:  # a site's model or torchvision's: anything it raises
        return (
            f"model {name!r} does not take this run's samples of shape {shape}: "
            f"{one_line(exc, typed=True)}"
        )
    return None


def _test_evaluator(
    model: torch.nn.Module, test: Split
) -> Callable[[dict[str, torch.Tensor]], tuple[float, float]]:
    """Accuracy and loss of a global model on the coordinator's test split."""

    def evaluate_state(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        model.load_state_dict(state)
        return evaluate(model, test.x, test.y)

    return evaluate_state


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """What a run's results depend on. Rounds, deadlines, ports and such may change on resume.
    Evaluation at the silos keeps data out of training, so it is part of it (only then: run
    folders from before the setting existed stay resumable)."""
    d = effective_config(cfg)
    identity = {k: d[k] for k in ("silos", "data", "model", "trainer")} | {"seed": cfg.run.seed}
    if cfg.evaluation.where in ("silos", "both"):
        identity["evaluation"] = d["evaluation"]
    return identity


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
