from pathlib import Path

import pytest

from lssfl.common.config import ConfigError, load_config, parse_config

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
        ({"trainer": {"name": "fedavgg"}}, "unknown trainer 'fedavgg'"),
        ({"trainer": {"name": "fedavg", "lrr": 1}}, "no parameter 'lrr'"),
        ({"trainer": {"name": "fedavg", "epochs": "2"}}, "trainer.epochs must be an integer"),
        ({"model": {"name": "vgg"}}, "unknown model 'vgg'"),
        ({"data": {"kind": "s3"}}, "data.kind must be"),
        ({"coordinator": {"save_uploads": 1}}, "save_uploads must be true/false"),
    ],
)
def test_errors_name_the_key(patch, message):
    with pytest.raises(ConfigError, match="^x.yaml: ") as info:
        parse_config({**BASE, **patch}, "x.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


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
    cfg = parse_config({**BASE, "model": model, "trainer": trainer})
    assert cfg.trainer["exclude_head"] is expected
    assert "exclude_head" not in parse_config(BASE).trainer  # other trainers untouched


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
