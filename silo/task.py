"""What a silo checks of a task before it downloads a byte, whatever the task's kind.

The names and numbers in a task come from the coordinator, which may be hostile: each field
is checked against this silo's limits, and the trainer a TRAIN task asks for is built here,
once; that object is the one that trains.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lssfl.common.codecs import CodecError, CodecSpec, parse_codec
from lssfl.common.config import ConfigError
from lssfl.common.logs import one_line
from lssfl.common.models import build_model
from lssfl.common.peertext import peer_text
from lssfl.common.plugins import check_allowed, is_import_path
from lssfl.common.states import state_misfit
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.training.spec import build_trainer
from lssfl.training.trainers import LocalTrainer


class TaskRefused(Exception):
    """This silo will not or cannot do the task; the message is one line saying why."""


@dataclass(frozen=True)
class SiloLimits:
    """What a task may ask of this silo (``lssfl silo --allow-plugin/--max-epochs/
    --max-model-mb``)."""

    allowed_plugins: frozenset[str]
    max_epochs: int
    max_model_mb: float


@dataclass
class CheckedTask:
    """A task whose every field passed ``check_task``. ``trainer``: built from its spec for a
    TRAIN task (None for EVALUATE, which trains nothing)."""

    task: cpb.Task
    model_spec: dict[str, Any]
    trainer_spec: dict[str, Any]
    trainer: LocalTrainer | None
    uplink_codec: CodecSpec

    @property
    def trainer_name(self) -> Any:
        """The trainer's name as the task gave it, for our log lines."""
        return self.trainer_spec.get("name")


def _json_objects(task: cpb.Task, trains: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's model and (for TRAIN) trainer JSON, parsed; TaskRefused otherwise."""
    try:
        model_spec = json.loads(task.model_json)
        trainer = json.loads(task.trainer_json) if trains else {}
    except ValueError as exc:
        raise TaskRefused(
            f"task JSON does not parse: {peer_text(one_line(exc, typed=True), 300)}"
        ) from None
    if not isinstance(model_spec, dict) or not isinstance(trainer, dict):
        raise TaskRefused("task model and trainer must be JSON objects")
    return model_spec, trainer


def _check_model_size(model_spec: dict[str, Any], max_model_mb: float) -> None:
    """TaskRefused for a built-in architecture over ``max_model_mb``."""
    if is_import_path(str(model_spec.get("name"))):
        return  # a site's own model, allowed by its operator, is bounded by its download
    # On the meta device: an architecture of 10^12 parameters is refused unallocated.
    with torch.device("meta"):
        meta_model = build_model(model_spec)
    sizes = (t.numel() * t.element_size() for t in meta_model.state_dict().values())
    model_mb = sum(sizes) / 2**20
    if model_mb > max_model_mb:
        raise TaskRefused(f"model of {model_mb:.0f} MB exceeds --max-model-mb {max_model_mb:g}")


def _check_trainer_bounds(spec: Mapping[str, Any], trainer: LocalTrainer, max_epochs: int) -> None:
    """TaskRefused for a non-finite number, a batch or epoch count under 1, or more local
    epochs than ``max_epochs``."""
    for key, value in spec.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TaskRefused(f"trainer.{key} is {value}, not a finite number")
    if "batch_size" in spec and spec["batch_size"] < 1:
        raise TaskRefused(f"trainer.batch_size must be >= 1, got {spec['batch_size']}")
    if "epochs" in spec and spec["epochs"] < 1:
        raise TaskRefused(f"trainer.epochs must be >= 1, got {spec['epochs']}")
    # Plain trainers run `epochs`; a trainer with a schedule of its own (LSS) says how many.
    local_epochs = getattr(trainer, "local_epochs", None)
    epochs = local_epochs() if callable(local_epochs) else spec.get("epochs", 1)
    if epochs > max_epochs:
        raise TaskRefused(
            f"task asks for {epochs} local epochs, more than --max-epochs {max_epochs}"
        )


def check_task(task: cpb.Task, limits: SiloLimits) -> CheckedTask:
    """The task with every field checked against this silo's limits, its trainer built (TRAIN).

    TaskRefused (one line) for a field a coordinator should never send: unparsable JSON, an
    unknown or oversized model, a trainer parameter of the wrong type or out of bounds, too
    many epochs, an unknown codec. PluginNotAllowed (the silo stops) for an import path its
    command line does not allow, before anything is imported.
    """
    trains = task.kind != cpb.Task.EVALUATE
    model_spec, trainer_section = _json_objects(task, trains)
    check_allowed(str(model_spec.get("name")), limits.allowed_plugins, "model")
    if trains:
        check_allowed(str(trainer_section.get("name")), limits.allowed_plugins, "trainer")
    trainer: LocalTrainer | None = None
    spec: dict[str, Any] = {}
    try:
        if trains:
            trainer, spec = build_trainer(trainer_section)
        codec = parse_codec(task.uplink_codec or "fp32")
        _check_model_size(model_spec, limits.max_model_mb)
    except (ValueError, TypeError, ConfigError, CodecError) as exc:
        raise TaskRefused(peer_text(" ".join(str(exc).split()), 300)) from None
    if trainer is not None:
        _check_trainer_bounds(spec, trainer, limits.max_epochs)
    return CheckedTask(task, model_spec, spec, trainer, codec)


def check_received(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """TaskRefused unless ``state`` has exactly the model's tensors, shapes and dtypes."""
    misfit = state_misfit(state, model.state_dict(), finite=False)
    if misfit is None:
        return
    got, expected = misfit.got, misfit.expected
    if got is None or expected is None:  # a tensor one has and the other lacks
        raise TaskRefused(
            "received model does not fit the task's architecture "
            f"(tensor {peer_text(misfit.name)!r})"
        )
    raise TaskRefused(
        f"received tensor {misfit.name!r} is {got.dtype} {list(got.shape)}, the model has "
        f"{expected.dtype} {list(expected.shape)}"
    )
