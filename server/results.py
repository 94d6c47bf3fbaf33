"""What the coordinator keeps of each joined silo and of each accepted result."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from lssfl.common.records import RecordError, SiloEvaluation
from lssfl.common.states import check_state
from lssfl.server.store import RoundStore

log = logging.getLogger("lssfl.coordinator")


@dataclass
class SiloInfo:
    """What the coordinator knows of a joined silo."""

    silo_id: str
    num_samples: int
    device: str
    last_seen: float
    state: str = "idle"
    told_done: bool = False
    recorded_at: float = 0.0  # when its row in the store last followed a heartbeat
    joined_at: float = field(default_factory=time.monotonic)


@dataclass
class SiloResult:
    """One silo's accepted answer to a round; its model waits on disk at ``path``."""

    silo_id: str
    num_samples: int
    train_seconds: float
    metrics: dict[str, float]
    bytes_up: tuple[int, int, int]  # the upload's serialized, raw fp32 and payload bytes
    path: Path = Path()
    # The silo's measure of the model it received this round (the previous round's).
    evaluation: SiloEvaluation | None = None

    def meta(self, run_id: str, round_num: int) -> dict[str, str]:
        """What the upload's file keeps of this result beside the tensors."""
        return {
            "run_id": run_id,
            "round": str(round_num),
            "silo": self.silo_id,
            "num_samples": str(self.num_samples),
            "train_seconds": repr(self.train_seconds),
            "metrics": json.dumps(self.metrics),
            "bytes_up": json.dumps(list(self.bytes_up)),
            "evaluation": json.dumps(self.evaluation.to_dict() if self.evaluation else None),
        }

    @classmethod
    def from_meta(cls, path: Path, meta: dict[str, str]) -> SiloResult:
        """The result a kept upload's file describes (ValueError if it does not)."""
        try:
            metrics = json.loads(meta["metrics"])
            bytes_up = json.loads(meta["bytes_up"])
            evaluation = json.loads(meta.get("evaluation", "null"))
            return cls(
                meta["silo"],
                int(meta["num_samples"]),
                float(meta["train_seconds"]),
                {str(k): float(v) for k, v in metrics.items()},
                (int(bytes_up[0]), int(bytes_up[1]), int(bytes_up[2])),
                path,
                None if evaluation is None else SiloEvaluation.from_dict(evaluation),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecordError) as exc:
            raise ValueError(f"{path.name}: unreadable metadata ({exc})") from None

    def load(self) -> dict[str, torch.Tensor]:
        """The uploaded model, read back from disk."""
        return load_file(self.path)


def kept_results(
    store: RoundStore,
    round_num: int,
    enrolled: list[str],
    run_id: str,
    like: dict[str, torch.Tensor],
) -> dict[str, SiloResult]:
    """Uploads accepted for ``round_num`` before a restart and still valid: a silo
    selected again counts with it, without training again (and its bytes as sent then)."""
    kept = {}
    for silo, (path, meta) in store.kept_uploads(round_num).items():
        if silo not in enrolled or meta.get("run_id") != run_id:
            continue
        try:
            result = SiloResult.from_meta(path, meta)
            problem = check_state(result.load(), like)
        except (ValueError, OSError) as exc:
            problem = str(exc)
        if problem or result.num_samples <= 0:
            log.warning("round=%d silo=%s kept upload not used: %s", round_num, silo, problem)
            continue
        kept[silo] = result
    return kept
