"""The run config's trainer section, resolved once against the trainer it names.

``lssfl.common.config`` reads the run config without knowing any trainer (common imports no
role and no training code): to it ``trainer`` is a mapping with a string ``name``. What each
trainer accepts is known here. Whoever loads a config for use (the ``lssfl`` commands, the
benchmarks) calls ``resolve_trainer`` once: from then on ``cfg.trainer`` is the trainer's
whole spec, every default filled in, and that is what the coordinator records in config.yaml,
in the run identity, and sends to the silos. A silo checks a task's spec with
``build_trainer``, which builds the trainer that then trains.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from lssfl.common.config import ConfigError, RunConfig, coerce_value, config_to_dict
from lssfl.common.models import build_model, check_head
from lssfl.training.trainers import LocalTrainer, make_trainer, trainer_class

# Trainers that keep a replaced classifier head out of their pool by default (exclude_head).
HEAD_EXCLUDING = ("lss", "lss-paper")


def build_trainer(
    section: Mapping[str, Any], source: str = ""
) -> tuple[LocalTrainer, dict[str, Any]]:
    """The trainer ``section`` names, built once, and its spec ``{"name": ..., **every
    hyper-parameter}`` with the defaults filled in.

    A dataclass trainer's values are typed like any config key first (``lr: 1e-3``, a string
    to YAML 1.1, becomes 0.001). ConfigError, one line naming the key (prefixed with
    ``source`` when given), for an unknown trainer or parameter or a value of the wrong type.
    """
    prefix = f"{source}: " if source else ""
    try:
        cls = trainer_class(section.get("name"))
    except ValueError as exc:
        raise ConfigError(f"{prefix}trainer: {exc}") from None
    typed = dict(section)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        try:
            typed = {
                k: coerce_value(v, hints[k], f"trainer.{k}") if k in hints and k != "name" else v
                for k, v in section.items()
            }
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
    try:
        trainer = make_trainer(typed)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix}trainer: {exc}") from None
    if not dataclasses.is_dataclass(trainer):
        return trainer, typed  # a site's trainer that is no dataclass: its section as given
    return trainer, {"name": section["name"], **dataclasses.asdict(trainer)}


def trainer_spec(section: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """``build_trainer``'s spec alone."""
    return build_trainer(section, source)[1]


def _check_model(cfg: RunConfig) -> None:
    """The model builds, and has its classifier last when something treats the head apart
    (the trainer's ``exclude_head``/``head_only`` as written, or ``model.init: pretrain``)."""
    try:
        model = build_model(cfg.model_spec)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    head_aware = [
        f"trainer.{k}" for k in ("exclude_head", "head_only") if cfg.trainer.get(k) is True
    ]
    if cfg.model.init == "pretrain":
        head_aware.append("model.init: pretrain")
    if head_aware:
        num_classes = cfg.model.kwargs.get("num_classes")
        try:
            check_head(model, num_classes if isinstance(num_classes, int) else None)
        except ValueError as exc:
            raise ConfigError(f"model ({', '.join(head_aware)}): {exc}") from None


def resolve_trainer(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its trainer section resolved: the model checked against it, the trainer
    built once, every default filled in (LSS's ``exclude_head`` from ``model.init``).
    ConfigError, one line prefixed with the config's source, naming the key."""
    try:
        _check_model(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source}: {exc}" if cfg.source else str(exc)) from None
    section = dict(cfg.trainer)
    if section.get("name") in HEAD_EXCLUDING and "exclude_head" not in section:
        # Every init but "random" gives the model a fresh classifier head (the paper's
        # setting), which LSS keeps out of the pool: pooled, the affinity term holds the
        # new head near its random start.
        section["exclude_head"] = cfg.model.init != "random"
    _, spec = build_trainer(section, cfg.source)
    return dataclasses.replace(cfg, trainer=spec)


def effective_config(cfg: RunConfig) -> dict[str, Any]:
    """A resolved config (``resolve_trainer``) as plain data, every default filled in."""
    return config_to_dict(cfg)


def trainer_warnings(cfg: RunConfig) -> list[str]:
    """One line for each thing in a resolved trainer section that will quietly cost accuracy.

    Today: LSS on a random start. The affinity term keeps every pool member near the weights
    the silo received, which is what makes the soup work on a pre-trained start; on random
    weights it holds the model near random ones.
    """
    spec = cfg.trainer
    if spec["name"] not in HEAD_EXCLUDING or cfg.model.init != "random" or not spec.get("lambda_a"):
        return []
    return [
        f"lss on a random start (model.init: random): the affinity term (lambda_a "
        f"{spec['lambda_a']:g}) keeps every pool member near the weights it received, so the "
        "model stays near random ones (0.33 after 3 rounds on the embedded digits, from 0.10); "
        "start from trained weights (model.init: pretrain or pretrained) or set "
        "trainer.lambda_a: 0, or train with fedavg first"
    ]
