"""The trainer spec is resolved once, end to end: the coordinator builds its trainer once,
records and sends the same spec; a silo builds one trainer per task, and that one trains."""

import json
import time

import pytest
import torch
import yaml

from lssfl.common.config import parse_config
from lssfl.common.models import build_model
from lssfl.dataprep.silodata import SiloData
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.server.coordinator import Coordinator
from lssfl.server.store import RoundStore
from lssfl.silo.daemon import SiloDaemon
from lssfl.silo.task import SiloLimits, check_task
from lssfl.training.lss import LSSTrainer
from lssfl.training.spec import effective_config, resolve_trainer, trainer_warnings

MODEL = {"name": "mlp", "in_features": 48, "num_classes": 2}
CONFIG = {
    "silos": ["s1", "s2"],
    "model": {"name": "mlp", "init": "random", "kwargs": {"in_features": 48, "num_classes": 2}},
    "data": {"kind": "folders"},
    # YAML 1.1 reads 1e-3 as a string: resolved, it is the number.
    "trainer": {"name": "lss", "pool_size": 2, "lr": "1e-3", "lambda_a": 1},
}


@pytest.fixture
def constructions(monkeypatch):
    """How many LSS trainers were built so far."""
    count = [0]
    original = LSSTrainer.__post_init__

    def counted(self):
        count[0] += 1
        original(self)

    monkeypatch.setattr(LSSTrainer, "__post_init__", counted)
    return count


def test_the_coordinator_builds_the_trainer_once_and_sends_what_it_records(tmp_path, constructions):
    cfg = resolve_trainer(parse_config(CONFIG, "c.yaml"))
    assert constructions[0] == 1
    recorded = yaml.safe_load(yaml.safe_dump(effective_config(cfg), sort_keys=False))
    assert trainer_warnings(cfg) != []  # lambda_a on a random start; read, not rebuilt
    state = build_model({"name": cfg.model.name, **cfg.model.kwargs}).state_dict()
    store = RoundStore(tmp_path)
    try:
        coordinator = Coordinator(cfg, store, state, lambda s: (0.0, 0.0), run_id="run1")
        task = coordinator.tasks.train(1, "s1", time.monotonic() + 60)  # the TRAIN task it sends
        sent = json.loads(task.trainer_json)
    finally:
        store.close()
    assert constructions[0] == 1
    assert sent == recorded["trainer"] == cfg.trainer
    # Every default filled in, the exclude_head default for a random start included.
    assert sent["exclude_head"] is False and sent["epochs_per_member"] == 8
    assert sent["lr"] == 0.001 and sent["lambda_a"] == 1.0 and sent["pool_size"] == 2


def test_the_resolved_values_are_the_trainer_s_defaults():
    cfg = resolve_trainer(parse_config({**CONFIG, "model": {**CONFIG["model"], "init": "random"},
                                        "trainer": {"name": "lss-paper"}}))  # fmt: skip
    assert cfg.trainer["lambda_a"] == 3.0 and cfg.trainer["head_epochs"] == 0
    again = resolve_trainer(cfg)
    assert again.trainer == cfg.trainer  # resolving a resolved config changes nothing


def test_a_silo_builds_one_trainer_per_task_and_trains_with_it(constructions):
    g = torch.Generator().manual_seed(0)
    data = SiloData(torch.randn(8, 3, 4, 4, generator=g), torch.arange(8) % 2, 2, "test")
    daemon = SiloDaemon("127.0.0.1:9", "s1", data, torch.device("cpu"))
    try:
        for r in (1, 2):
            task = cpb.Task(
                kind=cpb.Task.TRAIN,
                round=r,
                seed=r,
                model_json=json.dumps(MODEL),
                trainer_json=json.dumps(
                    {"name": "lss", "pool_size": 2, "epochs_per_member": 1, "batch_size": 4}
                ),
            )
            checked = check_task(task, daemon.limits)
            model = build_model(MODEL)
            trained = daemon.train(checked, model, time.monotonic())
            assert "train_loss" in trained.metrics
            assert constructions[0] == r  # one per task: check_task's, which trained
    finally:
        daemon.close()


def test_silo_limits_apply_to_the_built_trainer():
    from lssfl.silo.task import TaskRefused

    task = cpb.Task(
        kind=cpb.Task.TRAIN,
        model_json=json.dumps(MODEL),
        trainer_json=json.dumps({"name": "lss", "pool_size": 3}),
    )
    with pytest.raises(TaskRefused, match="task asks for 24 local epochs, more than"):
        check_task(task, SiloLimits(frozenset(), max_epochs=10, max_model_mb=64))
