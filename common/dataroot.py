"""Where each silo's data and the coordinator's test set live for a given config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lssfl.common.config import RunConfig
from lssfl.common.data import materialize_embedded


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
            root, num_silos=len(cfg.silos), alpha=cfg.data.alpha, seed=cfg.data.seed
        )
        dirs = [layout.silo_dirs[f"silo-{i + 1}"] for i in range(len(cfg.silos))]
        return DataRoot(
            dict(zip(cfg.silos, dirs, strict=True)), layout.test_dir, layout.pretrain_dir
        )
    return DataRoot({s: root / s for s in cfg.silos}, root / "test", None)
