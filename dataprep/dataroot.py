"""Where each silo's data and the coordinator's test set live for a given config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lssfl.common.config import RunConfig
from lssfl.dataprep.embedded import materialize_embedded


@dataclass
class DataRoot:
    """Where a run's data lies: one split folder per silo, the test split, the public split."""

    silo_dirs: dict[str, Path]
    test_dir: Path
    pretrain_dir: Path | None


def prepare_data_root(cfg: RunConfig) -> DataRoot:
    """Generate the embedded data if needed (cached); map enrolled silos to folders."""
    root = Path(cfg.data.root)
    if cfg.data.kind == "embedded":
        layout = materialize_embedded(
            root,
            num_silos=len(cfg.silos),
            alpha=cfg.data.alpha,
            seed=cfg.data.seed,
            **{k: v for k in ("domains", "pretrain_domains") if (v := getattr(cfg.data, k))},
        )
        dirs = [layout.silo_dirs[f"silo-{i + 1}"] for i in range(len(cfg.silos))]
        return DataRoot(
            dict(zip(cfg.silos, dirs, strict=True)), layout.test_dir, layout.pretrain_dir
        )
    return DataRoot({s: root / s for s in cfg.silos}, root / "test", None)


def with_evaluation_resolved(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``evaluation.where`` decided: as configured, else the coordinator when
    it has a test split (always with embedded data; ``data.root/test`` with folders), else the
    silos. ConfigError when "coordinator" or "both" is asked without a test split."""
    from lssfl.common.config import ConfigError

    has_test = cfg.data.kind == "embedded" or (Path(cfg.data.root) / "test").is_dir()
    where = cfg.evaluation.where or ("coordinator" if has_test else "silos")
    if where != "silos" and not has_test:
        raise ConfigError(
            f"{cfg.source}: evaluation.where {where!r} needs the coordinator's test split at "
            f"{Path(cfg.data.root) / 'test'}; without one use evaluation.where: silos"
        )
    evaluation = dataclasses.replace(cfg.evaluation, where=where)
    return dataclasses.replace(cfg, evaluation=evaluation)
