from pathlib import Path

import pytest

from lssfl.common.config import ConfigError, RunConfig, load_config, parse_config
from lssfl.dataprep.embedded import check_data_section
from lssfl.training.spec import resolve_trainer, trainer_spec

BASE = {"silos": ["a", "b"], "trainer": {"name": "fedavg", "epochs": 1}}


def test_defaults_and_int_to_float():
    cfg = parse_config({**BASE, "coordinator": {"round_deadline_s": 5}})
    assert cfg.coordinator.round_deadline_s == 5.0 and cfg.run.rounds == 3
    assert cfg.model_spec == {"name": "cnn"}


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"run": {"rounds": "three"}}, "run.rounds must be an integer, got 'three'"),
        ({"runn": {}}, "unknown key runn"),
        ({"run": {"seeds": 1}}, "unknown key run.seeds"),
        ({"coordinator": {"min_silos": 5}}, "coordinator.min_silos must be between 1 and 2"),
        ({"silos": "a"}, "silos must be a list"),
        ({"silos": []}, "silos must list"),
        ({"trainer": {"epochs": 2}}, "trainer.name must be a string, got None"),
        ({"data": {"kind": "s3"}}, "data.kind must be"),
        ({"coordinator": {"save_uploads": 1}}, "save_uploads must be true/false"),
    ],
)
def test_errors_name_the_key(patch, message):
    with pytest.raises(ConfigError, match="^x.yaml: ") as info:
        parse_config({**BASE, **patch}, "x.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_model_errors_name_the_key_when_the_trainer_is_resolved():
    cfg = parse_config({**BASE, "model": {"name": "vgg"}}, "x.yaml")  # common builds no model
    with pytest.raises(ConfigError, match="^x.yaml: model: unknown model 'vgg'") as info:
        resolve_trainer(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "trainer, message",
    [
        ({"name": "fedavgg"}, "trainer: unknown trainer 'fedavgg'"),
        ({"name": "fedavg", "lrr": 1}, "no parameter 'lrr'"),
        ({"name": "fedavg", "epochs": "2"}, "trainer.epochs must be an integer"),
    ],
)
def test_trainer_errors_name_the_key(trainer, message):
    cfg = parse_config({**BASE, "trainer": trainer}, "x.yaml")  # common knows no trainer
    with pytest.raises(ConfigError, match="^x.yaml: ") as info:
        trainer_spec(cfg.trainer, cfg.source)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_trainer_spec_fills_the_defaults():
    import dataclasses

    from lssfl.training.trainers import FedProxTrainer

    spec = trainer_spec({"name": "fedprox", "mu": 0.1})
    assert spec == {"name": "fedprox", **dataclasses.asdict(FedProxTrainer(mu=0.1))}
    assert spec["mu"] == 0.1 and "epochs" in spec


def test_a_bad_trainer_parameter_stops_lssfl_run_before_anything_starts(tmp_path):
    from tests.conftest import run_lssfl

    path = tmp_path / "c.yaml"
    path.write_text("silos: [a]\ntrainer: {name: fedavg, lrr: 1}\n")
    proc = run_lssfl("run", "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"lssfl: error: {path}: trainer: trainer 'fedavg' has no parameter 'lrr'"
    )
    assert not (tmp_path / "run").exists()


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    "model, trainer, expected",
    [
        ({"init": "pretrain"}, {"name": "lss"}, True),  # the head is replaced: not pooled
        ({"init": "random"}, {"name": "lss"}, False),  # nothing replaced: the paper's pool
        ({"init": "pretrain"}, {"name": "lss", "exclude_head": False}, False),  # as written
        ({"init": "random"}, {"name": "lss", "exclude_head": True}, True),
    ],
)
def test_lss_keeps_a_replaced_head_out_of_the_pool_by_default(model, trainer, expected):
    cfg = resolve_trainer(parse_config({**BASE, "model": model, "trainer": trainer}))
    assert cfg.trainer["exclude_head"] is expected
    assert "exclude_head" not in resolve_trainer(parse_config(BASE)).trainer  # not fedavg's


def test_shipped_demo_config_is_valid():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert len(cfg.silos) == 5 and cfg.data.kind == "embedded"


def test_config_show_prints_every_default(tmp_path):
    import yaml

    from tests.conftest import run_lssfl

    path = tmp_path / "c.yaml"
    path.write_text("silos: [a]\ntrainer: {name: lss}\n")
    proc = run_lssfl("config", "show", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["trainer"]["pool_size"] == 4 and shown["trainer"]["name"] == "lss"
    assert shown["coordinator"]["round_deadline_s"] == 300.0
    # What it prints is itself a valid config.
    assert parse_config(shown).trainer == shown["trainer"]


def test_yaml_exponent_floats_are_numbers_in_every_float_field(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; every float key, the trainer's included,
    # must take it as the number it means.
    path = tmp_path / "c.yaml"
    path.write_text(
        "silos: [a]\n"
        "coordinator: {round_deadline_s: 3e2, max_upload_mb: 1E3}\n"
        "data: {alpha: 5e-1}\n"
        "trainer: {name: lss, lr: 1e-3, lambda_a: 1e1}\n"
    )
    # The trainer's keys are typed by the trainer (lssfl.training.spec).
    cfg = resolve_trainer(load_config(path))
    assert cfg.coordinator.round_deadline_s == 300.0 and cfg.coordinator.max_upload_mb == 1000.0
    assert cfg.data.alpha == 0.5
    assert cfg.trainer["lr"] == 0.001 and cfg.trainer["lambda_a"] == 10.0
    assert isinstance(cfg.trainer["lr"], float)
    for bad in ("1e-3x", "fast", ""):
        with pytest.raises(ConfigError, match=f"trainer.lr must be a number, got '{bad}'"):
            resolve_trainer(parse_config({**BASE, "trainer": {"name": "fedavg", "lr": bad}}))
    # Integers stay integers: "1e3" is no epoch count.
    with pytest.raises(ConfigError, match="trainer.epochs must be an integer"):
        resolve_trainer(parse_config({**BASE, "trainer": {"name": "fedavg", "epochs": "1e3"}}))


def test_embedded_domains_are_checked_before_use():
    # The data layer checks its own section, right after the config is loaded.
    def checked(data: dict) -> RunConfig:
        cfg = parse_config({**BASE, **data})
        check_data_section(cfg)
        return cfg

    cfg = checked({"data": {"domains": ["original"], "pretrain_domains": ["noisy"]}})
    assert cfg.data.domains == ["original"] and cfg.data.pretrain_domains == ["noisy"]
    with pytest.raises(ConfigError, match="data.domains: unknown domain 'Original'"):
        checked({"data": {"domains": ["Original"]}})
    with pytest.raises(ConfigError, match="data.pretrain_domains applies to data.kind 'embedded'"):
        checked(
            {
                "model": {"init": "random"},
                "data": {"kind": "folders", "pretrain_domains": ["noisy"]},
            }
        )


def test_a_bad_domain_fails_the_command_in_one_line(tmp_path: Path, capsys):
    from lssfl.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("silos: [a, b]\ntrainer: {name: fedavg}\ndata: {domains: [Original]}\n")
    assert main(["config", "show", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{path}: data.domains: unknown domain 'Original'" in err


def test_lss_on_a_random_start_is_told_before_the_run():
    from lssfl.training.spec import trainer_warnings

    def warnings(init: str, trainer: dict) -> list[str]:
        cfg = parse_config({**BASE, "model": {"init": init}, "trainer": trainer})
        return trainer_warnings(resolve_trainer(cfg))

    (line,) = warnings("random", {"name": "lss-paper"})
    assert "random start" in line and "lambda_a 3" in line and "model.init: pretrain" in line
    assert warnings("random", {"name": "lss", "lambda_a": 0.5}) != []
    # lssfl's default LSS has no affinity term; a pre-trained start is what LSS is made for.
    assert warnings("random", {"name": "lss"}) == []
    assert warnings("pretrain", {"name": "lss-paper"}) == []
    assert warnings("random", {"name": "fedavg"}) == []
