"""A site's own model and trainer by import path, and torchvision models by name."""

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lssfl.cli import main
from lssfl.common.config import ConfigError, parse_config
from lssfl.common.models import build_model, head_linear
from lssfl.common.plugins import PluginNotAllowed
from lssfl.dataprep.silodata import SiloData
from lssfl.dataprep.splits import save_split
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.silo.daemon import SiloDaemon
from lssfl.training.spec import resolve_trainer, trainer_spec
from lssfl.training.trainers import make_trainer
from tests.conftest import lssfl_cmd, read_jsonl

# Imported by the test process, by `lssfl run`'s processes, and never by a silo that does
# not allow it: each importer appends its pid to $PLUG_FL_MARKER.
PLUGIN = """
import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

if os.environ.get("PLUG_FL_MARKER"):
    with open(os.environ["PLUG_FL_MARKER"], "a") as marker:
        marker.write(f"{os.getpid()}\\n")


def build(num_classes=10, hidden=8):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def head_first(num_classes=10):
    model = nn.Sequential()
    model.add_module("classifier", nn.Linear(4, num_classes))
    model.add_module("body", nn.Linear(3 * 16 * 16, 4))
    return model


def not_a_model(**kwargs):
    return "a string"


NOT_CALLABLE = 3


@dataclasses.dataclass
class FewSteps:
    steps: int = 2
    lr: float = 0.1

    def train(self, model, x, y, *, seed):
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        for _ in range(self.steps):
            idx = torch.randint(len(x), (32,), generator=generator)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"train_loss": loss.item(), "steps": float(self.steps)}


class NoTrain:
    pass
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    name = f"plug_fl_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"  # fresh per test
    (folder / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PLUG_FL_MARKER", str(tmp_path / "imported-by"))
    return folder / f"{name}.py"


def test_a_plug_in_model_builds_with_its_kwargs(plugin):
    model = build_model({"name": f"{plugin.stem}:build", "hidden": 5, "num_classes": 3})
    name, head = head_linear(model)
    assert (name, head.in_features, head.out_features) == ("3", 5, 3)


def test_any_torchvision_classification_model_builds_by_name():
    model = build_model({"name": "mobilenet_v3_small"})
    assert head_linear(model)[1].out_features == 10  # the built-ins' class count, not 1000
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize(
    "name,message",
    [
        ("nowhere_pkg_xyz:build", "module 'nowhere_pkg_xyz' not found"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:NOT_CALLABLE", "NOT_CALLABLE is not callable (a 'int')"),
        ("{mod}:not_a_model", "returned a str, not an nn.Module"),
        (":build", "an import path is 'package.module:name'"),
        ("resnet19", "unknown model 'resnet19'"),
    ],
)
def test_model_errors_are_one_line_from_the_cli(plugin, tmp_path, capsys, name, message):
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"silos": ["a"], "model": {"name": name.format(mod=plugin.stem)}}))
    assert main(["config", "show", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lssfl: error: {config}: model: ") and message in err
    assert err.count("\n") == 1


def test_head_aware_features_need_the_classifier_last(plugin):
    spec = {"silos": ["a"], "model": {"name": f"{plugin.stem}:head_first", "init": "random"}}
    resolve_trainer(parse_config(spec))  # nothing treats the head apart: fine
    spec["model"]["kwargs"] = {"num_classes": 10}
    spec["trainer"] = {"name": "fedavg", "head_only": True}
    with pytest.raises(ConfigError, match=r"model \(trainer.head_only\): the last nn.Linear .*"
                       r"has 4 outputs, not num_classes 10"):  # fmt: skip
        resolve_trainer(parse_config(spec))
    spec["model"] = {"name": "squeezenet1_0", "init": "pretrain"}  # a conv classifier
    with pytest.raises(ConfigError, match="no nn.Linear layer to serve as its classifier head"):
        resolve_trainer(parse_config(spec))


def test_a_plug_in_trainer_is_checked_like_a_built_in(plugin):
    name = f"{plugin.stem}:FewSteps"
    assert trainer_spec({"name": name, "steps": 3}) == {"name": name, "steps": 3, "lr": 0.1}
    with pytest.raises(ConfigError, match="trainer.steps must be an integer, got 'x'"):
        trainer_spec({"name": name, "steps": "x"})
    with pytest.raises(ValueError, match="has no parameter 'epochs'"):
        make_trainer({"name": name, "epochs": 1})
    with pytest.raises(ValueError, match="made a NoTrain, which has no train"):
        make_trainer({"name": f"{plugin.stem}:NoTrain"})


def test_a_silo_imports_no_path_it_was_not_allowed(tmp_path):
    """The names in a task come from the coordinator: refused before anything is imported or
    downloaded."""
    never = f"never_imported_{os.getpid()}"
    (tmp_path / f"{never}.py").write_text("raise SystemExit('imported')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        data = SiloData(torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long), 10, "test")
        daemon = SiloDaemon("127.0.0.1:9", "s1", data, torch.device("cpu"))
        for model, trainer, what in [
            (f"{never}:build", "fedavg", "model"),
            ("cnn", f"{never}:Trainer", "trainer"),
        ]:
            task = cpb.Task(
                kind=cpb.Task.TRAIN,
                round=1,
                model_json=json.dumps({"name": model}),
                trainer_json=json.dumps({"name": trainer}),
            )
            with pytest.raises(PluginNotAllowed, match=f"asks for {what} '{never}:"):
                daemon.train_round(task)
            assert never not in sys.modules and daemon.held_model.state is None
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.slow  # lssfl processes
def test_lssfl_run_with_a_plug_in_model_and_trainer(plugin, tmp_path, write_config):
    """One real run carries #12's other features too: TensorBoard files, in-round progress."""
    mod = plugin.stem
    config = write_config(
        run={"rounds": 1, "tensorboard": True},
        silos=["silo-1", "silo-2"],
        model={"name": f"{mod}:build", "kwargs": {"hidden": 6}, "init": "random"},
    )
    text = yaml.safe_load(config.read_text())
    text["trainer"] = {"name": f"{mod}:FewSteps", "steps": 3}  # in place of the defaults'
    config.write_text(yaml.safe_dump(text))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{plugin.parent}{os.pathsep}{os.getcwd()}"}
    proc = subprocess.run(
        lssfl_cmd("run", "--config", str(config), "--run-dir", str(run_dir)),
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["status"] for r in records] == ["initial", "ok"]
    # The site's trainer ran with the config's hyper-parameter, on every silo.
    assert [s["train_steps"] for s in records[1]["silos"]] == [3.0, 3.0]
    assert load_file(run_dir / "final_model.safetensors")["1.weight"].shape == (6, 768)
    # Coordinator, both silos (and the launcher's config check) imported the site's module.
    assert len(set((tmp_path / "imported-by").read_text().split())) >= 3
    # Progress inside the round, then the round's row.
    lines = proc.stdout.splitlines()
    done = lines.index("round 1: 2/2 silos reported (silo-1, silo-2)")
    assert any(line.startswith("round 1: 0/2 silos reported") for line in lines[:done])
    assert lines[done + 1].split()[0] == "1"  # the round's row

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("global/accuracy")
    assert [e.step for e in accuracy] == [0, 1]
    assert [e.value for e in accuracy] == pytest.approx([r["global_accuracy"] for r in records])
    assert events.Scalars("bytes/up")[-1].value == pytest.approx(records[1]["bytes_up"])
    assert events.Scalars("silo/silo-2/train_steps")[-1].value == 3.0
    silo1 = records[1]["silos"][0]
    assert events.Scalars("silo/silo-1/bytes_down")[-1].value == pytest.approx(silo1["bytes_down"])


@pytest.mark.slow  # one silo process
def test_lssfl_silo_refuses_a_path_it_was_not_allowed_in_one_line(plugin, tmp_path):
    from lssfl.server.coordinator import Coordinator
    from lssfl.server.service import serve
    from lssfl.server.store import RoundStore

    cfg = parse_config(
        {
            "silos": ["silo-1"],
            "run": {"rounds": 1},
            "coordinator": {"round_deadline_s": 30, "join_timeout_s": 30},
            "model": {"name": f"{plugin.stem}:build", "init": "random"},
            "data": {"kind": "folders"},
        }
    )
    state = build_model(cfg.model_spec).state_dict()
    coordinator = Coordinator(cfg, RoundStore(tmp_path / "run"), state, lambda s: (0.0, 0.0))
    server, port = serve(coordinator, "127.0.0.1", 0)

    def drive() -> None:
        with contextlib.suppress(KeyboardInterrupt):  # what stop() raises mid-round
            coordinator.run()

    driver = threading.Thread(target=drive)
    driver.start()
    data = tmp_path / "data"
    save_split(data, torch.rand(8, 3, 16, 16), torch.arange(8) % 10)
    (tmp_path / "imported-by").unlink(missing_ok=True)
    try:
        proc = subprocess.run(
            lssfl_cmd("silo", "--coordinator", f"127.0.0.1:{port}", "--silo-id", "silo-1",
                      "--data", str(data), "--max-wait", "20"),
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": f"{plugin.parent}{os.pathsep}{os.getcwd()}"},
        )  # fmt: skip
    finally:
        coordinator.stop()
        driver.join(30)
        server.stop(0)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("lssfl: error:")]
    assert error == [
        f"lssfl: error: the coordinator asks for model '{plugin.stem}:build', which this silo "
        f"does not allow (start it with --allow-plugin {plugin.stem}:build to run that code)"
    ], proc.stderr
    assert not (tmp_path / "imported-by").exists()  # the silo never imported it
    assert coordinator.meter.get(1, "silo-1", "down").bytes < 10_000  # no model was sent
