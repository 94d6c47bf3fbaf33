"""Run configuration: one YAML file read by the launcher and the coordinator.

Parsing is strict: an unknown key, a missing section or a value of the wrong type stops the
program with one line that names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# coordinator.aggregation's known rules (lssfl.server.aggregate.RULES implements them).
AGGREGATION_RULES = ("weighted_mean",)


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass
class RunSection:
    """``run``: the run's name, seed, number of rounds and output folder."""

    name: str = "run"
    seed: int = 0
    rounds: int = 3
    out_dir: str = "runs"
    # TensorBoard event files in <run folder>/tensorboard (pip install 'lssfl[tensorboard]').
    tensorboard: bool = False


@dataclass
class CoordinatorSection:
    """``coordinator``: where it listens, how many silos a round needs, deadlines."""

    host: str = "127.0.0.1"
    port: int = 0
    min_silos: int = 1
    round_deadline_s: float = 300.0
    join_timeout_s: float = 120.0
    heartbeat_interval_s: float = 2.0
    # Keep every decoded upload on disk (uploads/round-NNNN/SILO.safetensors), for audits and
    # tests.
    save_uploads: bool = False
    max_upload_mb: float = 2048.0
    # A model stream (download or upload) that moves no message for this long is cancelled,
    # and none outlives its round's deadline: a stalled peer cannot hold a server thread.
    stream_idle_timeout_s: float = 30.0
    # Uploads decoded at once hold this many MB of model in memory together; further
    # uploads wait for room (None: four times the model's size).
    max_inflight_upload_mb: float | None = None
    # Ask k + m live silos each round and aggregate the first k results (None: every live
    # silo, and wait for all of them).
    silos_per_round: int | None = None
    over_select: int = 0
    # How the round's models make the next global one (AGGREGATION_RULES).
    aggregation: str = "weighted_mean"
    # The most samples a silo may declare at Join; an upload may not weigh more than its
    # silo declared. Bounds how much one silo can weigh in the average.
    max_num_samples: int = 1_000_000_000
    # Refuse an upload whose L2 distance to the round's global model exceeds this (None: no
    # bound). Catches finite but absurd weights (1e38) that pass the finite check.
    max_update_norm: float | None = None
    # A round opens only with min_silos live silos; give up (exit 1) after waiting this long
    # for them in one stretch (None: wait until they come back or SIGTERM).
    max_wait_s: float | None = None
    # Serve Prometheus metrics at http://<host>:<port>/metrics (None: off; 0: any free port).
    prometheus_port: int | None = None


@dataclass
class DataSection:
    """``data``: where the silos' data comes from."""

    # "embedded": the bundled digits, generated under `root` on first use.
    # "folders": `root/<silo-id>/` and `root/test/` prepared by the user.
    kind: str = "embedded"
    root: str = "data/embedded"
    # Label skew of the embedded data: each class dealt over the silos in Dirichlet(alpha)
    # shares (lssfl.dataprep.dirichlet; smaller = more skew). None: an even deal.
    alpha: float | None = None
    seed: int = 0  # the embedded data's split; fixed across run seeds on purpose
    # The embedded data's domains: silo k holds domains[k % len], the public pre-training
    # split is rendered in pretrain_domains (None: all five each). A subset of pretrain_domains
    # makes a start that does not know every silo's domain; domains: [original] with a small
    # alpha is label shift alone.
    domains: list[str] | None = None
    pretrain_domains: list[str] | None = None


@dataclass
class ModelSection:
    """``model``: the architecture and its initial weights."""

    name: str = "cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # "pretrain": train on the embedded public split (cached); "random": seeded init;
    # "pretrained": torchvision ResNet weights, `weights` = "imagenet" or a local file
    # (.safetensors, or a .pth state dict), classifier head replaced for the task.
    init: str = "pretrain"
    pretrain_epochs: int = 20
    weights: str | None = None


@dataclass
class CompressionSection:
    """``compression``: the codec of each direction."""

    # Codecs (lssfl.common.codecs): fp32, fp16, bf16, int8, topk<fraction>+<values>, each
    # optionally +zstd or +zlib. Lossy uplinks send the update (local - received model).
    uplink: str = "fp32"
    downlink: str = "fp32"
    # Send silos that hold last round's model only the change (encoded with `downlink`).
    delta_downlink: bool = False


@dataclass
class SecuritySection:
    """``security``: TLS, client certificates, bearer tokens, revoked silos."""

    # Folder with ca.pem, coordinator.pem/.key, tokens.json and per-silo files, as written by
    # `lssfl certs`. `lssfl run` creates it when missing.
    dir: str | None = None
    tls: bool = False
    mutual_tls: bool = False  # silos must present a certificate signed by ca.pem, CN = silo id
    tokens: bool = False  # every RPC carries the silo's bearer token
    revoked: list[str] = field(default_factory=list)  # silo ids refused even with a token


@dataclass
class EvaluationSection:
    """``evaluation``: who measures the global model, and on what."""

    # "coordinator": on its own test split (data.root/test). "silos": each selected silo on
    # its own held-out data, reported to the coordinator, which records the sample-weighted
    # mean. "both". None: the coordinator when it has a test split, else the silos.
    where: str | None = None
    # The fraction of each silo's data kept out of training to evaluate on, drawn from
    # (run seed, silo id); a silo with its own test split uses that instead.
    holdout: float = 0.2


EVALUATION_WHERE = ("coordinator", "silos", "both")


@dataclass
class RunConfig:
    """One run's whole configuration, as read from its YAML file."""

    run: RunSection = field(default_factory=RunSection)
    silos: list[str] = field(default_factory=list)
    coordinator: CoordinatorSection = field(default_factory=CoordinatorSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    trainer: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    compression: CompressionSection = field(default_factory=CompressionSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    source: str = ""  # file it was read from; not a key

    @property
    def model_spec(self) -> dict[str, Any]:
        """The model section as ``build_model`` takes it: ``{name, **kwargs}``."""
        return {"name": self.model.name, **self.model.kwargs}


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
# PyYAML follows YAML 1.1, where a float needs a dot: `lr: 1e-3` arrives as the string "1e-3".
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (ints widen to floats); ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return coerce_value(value, inner, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return build_section(tp, value, key + ".")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if not ok:
        raise ConfigError(f"{key} must be {_TYPE_NAMES.get(tp, tp.__name__)}, got {value!r}")
    return value


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """``cls(**data)`` with every key known and every value of its field's type, else a
    ConfigError naming ``prefix + key``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    return cls(**{k: coerce_value(v, hints[k], prefix + k) for k, v in data.items()})


def _check(cfg: RunConfig) -> None:
    if cfg.run.rounds < 1:
        raise ConfigError("run.rounds must be at least 1")
    if not cfg.silos:
        raise ConfigError("silos must list the enrolled silo ids")
    if len(set(cfg.silos)) != len(cfg.silos):
        raise ConfigError("silos lists a silo id twice")
    if not 1 <= cfg.coordinator.min_silos <= len(cfg.silos):
        raise ConfigError(f"coordinator.min_silos must be between 1 and {len(cfg.silos)}")
    k = cfg.coordinator.silos_per_round
    if k is not None and not cfg.coordinator.min_silos <= k <= len(cfg.silos):
        raise ConfigError("coordinator.silos_per_round must be between min_silos and len(silos)")
    if cfg.coordinator.over_select < 0:
        raise ConfigError("coordinator.over_select must be >= 0")
    if cfg.coordinator.aggregation not in AGGREGATION_RULES:
        raise ConfigError(
            f"coordinator.aggregation {cfg.coordinator.aggregation!r} is not one of "
            f"{', '.join(AGGREGATION_RULES)}"
        )
    if cfg.coordinator.max_num_samples < 1:
        raise ConfigError("coordinator.max_num_samples must be >= 1")
    for key in ("max_update_norm", "max_wait_s"):
        bound = getattr(cfg.coordinator, key)
        if bound is not None and not bound > 0:
            raise ConfigError(f"coordinator.{key} must be a positive number or null")
    if cfg.coordinator.stream_idle_timeout_s <= 0:
        raise ConfigError("coordinator.stream_idle_timeout_s must be positive")
    inflight = cfg.coordinator.max_inflight_upload_mb
    if inflight is not None and inflight <= 0:
        raise ConfigError("coordinator.max_inflight_upload_mb must be positive")
    port = cfg.coordinator.prometheus_port
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"coordinator.prometheus_port must be 0..65535, got {port}")
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "run.tensorboard needs the tensorboard package: pip install 'lssfl[tensorboard]'"
        )
    from lssfl.common.codecs import CodecError, parse_codec

    for direction in ("uplink", "downlink"):
        try:
            codec = parse_codec(getattr(cfg.compression, direction))
        except CodecError as exc:
            raise ConfigError(f"compression.{direction}: {exc}") from None
        if direction == "downlink" and codec.topk and not cfg.compression.delta_downlink:
            raise ConfigError("compression.downlink top-k needs delta_downlink: true")
    sec = cfg.security
    if (sec.tls or sec.mutual_tls or sec.tokens) and not sec.dir:
        raise ConfigError("security.dir must name the certificate folder when tls/tokens are on")
    if sec.mutual_tls and not sec.tls:
        raise ConfigError("security.mutual_tls needs security.tls")
    if cfg.data.kind not in ("embedded", "folders"):
        raise ConfigError(f"data.kind must be 'embedded' or 'folders', got {cfg.data.kind!r}")
    # data.domains and data.pretrain_domains are the data layer's to check
    # (lssfl.dataprep.embedded.check_data_section): common does not import it.
    where = cfg.evaluation.where
    if where is not None and where not in EVALUATION_WHERE:
        raise ConfigError(
            f"evaluation.where must be one of {', '.join(EVALUATION_WHERE)}, got {where!r}"
        )
    if not 0.0 < cfg.evaluation.holdout < 1.0:
        raise ConfigError(f"evaluation.holdout must be in (0, 1), got {cfg.evaluation.holdout!r}")
    if cfg.model.init not in ("pretrain", "random", "pretrained"):
        raise ConfigError(
            f"model.init must be 'pretrain', 'random' or 'pretrained', got {cfg.model.init!r}"
        )
    if cfg.model.init == "pretrained" and (
        cfg.model.name not in ("resnet18", "resnet50") or not cfg.model.weights
    ):
        raise ConfigError("model.init 'pretrained' needs model.name resnet18/resnet50 and weights")
    if cfg.model.init == "pretrain" and cfg.data.kind != "embedded":
        raise ConfigError("model.init 'pretrain' needs data.kind 'embedded'")
    # The trainer section, and the model against it, are the trainer's to check
    # (lssfl.training.spec.resolve_trainer): common knows no trainer and builds no model.
    # Only what the coordinator itself reads is checked here.
    if not isinstance(cfg.trainer.get("name"), str):
        raise ConfigError(f"trainer.name must be a string, got {cfg.trainer.get('name')!r}")


def parse_config(data: Any, source: str = "<dict>") -> RunConfig:
    """A checked RunConfig from parsed YAML; ConfigError, one line naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        cfg = build_section(RunConfig, data)
        _check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    cfg.source = source
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """``parse_config`` of a YAML file; ConfigError when unreadable or invalid."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        hint = (
            " (`lssfl init` writes example configs)" if isinstance(exc, FileNotFoundError) else ""
        )
        raise ConfigError(f"cannot read config {path}: {exc.strerror}{hint}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    return parse_config(data, str(path))


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data, every default filled in; the trainer section as it stands
    (every default too once ``lssfl.training.spec.resolve_trainer`` resolved it)."""
    d = dataclasses.asdict(cfg)
    d.pop("source")
    return d
