"""The run config's trainer section, checked against the trainer it names.

``lssfl.common.config`` reads the run config without knowing any trainer (common imports no
role and no training code) and checks only ``trainer.name``; what each trainer accepts is
known here. Whoever takes a config from a user (the ``lssfl`` commands, the coordinator) checks
the section with ``trainer_spec`` before using it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from lssfl.common.config import (
    ConfigError,
    RunConfig,
    build_section,
    coerce_value,
    config_to_dict,
)
from lssfl.training.trainers import make_trainer, trainer_class


def trainer_spec(section: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """``{"name": ..., **every hyper-parameter}``, defaults filled in.

    ConfigError, one line naming the key (prefixed with ``source`` when given), for an unknown
    trainer or parameter or a value of the wrong type.
    """
    prefix = f"{source}: " if source else ""
    try:
        trainer = make_trainer(dict(section))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix}trainer: {exc}") from None
    params = {k: v for k, v in section.items() if k != "name"}
    if not dataclasses.is_dataclass(trainer):
        return {"name": section["name"], **params}  # a site's trainer that is no dataclass
    # Dataclass trainers (every built-in): check the hyper-parameters' types like any key.
    try:
        build_section(type(trainer), params, "trainer.")
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    return {"name": section["name"], **dataclasses.asdict(trainer)}


def check_trainer(cfg: RunConfig) -> None:
    """Type ``cfg.trainer``'s values like any other key (``lr: 1e-3``, a string to YAML 1.1,
    becomes 0.001) and check the section; ConfigError naming the key."""
    try:
        trainer_cls = trainer_class(cfg.trainer.get("name"))
    except ValueError as exc:
        prefix = f"{cfg.source}: " if cfg.source else ""
        raise ConfigError(f"{prefix}trainer: {exc}") from None
    if dataclasses.is_dataclass(trainer_cls):
        hints = typing.get_type_hints(trainer_cls)
        try:
            cfg.trainer = {
                k: coerce_value(v, hints[k], f"trainer.{k}") if k in hints else v
                for k, v in cfg.trainer.items()
            }
        except ConfigError as exc:
            raise ConfigError(f"{cfg.source}: {exc}" if cfg.source else str(exc)) from None
    trainer_spec(cfg.trainer, cfg.source)


def effective_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data with every default filled in, the trainer's included."""
    return config_to_dict(cfg) | {"trainer": trainer_spec(cfg.trainer, cfg.source)}


def trainer_warnings(cfg: RunConfig) -> list[str]:
    """One line for each thing in the trainer section that will quietly cost accuracy.

    Today: LSS on a random start. The affinity term keeps every pool member near the weights
    the silo received, which is what makes the soup work on a pre-trained start; on random
    weights it holds the model near random ones.
    """
    spec = trainer_spec(cfg.trainer, cfg.source)
    if (
        spec["name"] not in ("lss", "lss-paper")
        or cfg.model.init != "random"
        or not spec.get("lambda_a")
    ):
        return []
    return [
        f"lss on a random start (model.init: random): the affinity term (lambda_a "
        f"{spec['lambda_a']:g}) keeps every pool member near the weights it received, so the "
        "model stays near random ones (0.33 after 3 rounds on the embedded digits, from 0.10); "
        "start from trained weights (model.init: pretrain or pretrained) or set "
        "trainer.lambda_a: 0, or train with fedavg first"
    ]
