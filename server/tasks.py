"""The tasks the coordinator hands silos: what each carries, serialized once per run."""

from __future__ import annotations

import json
import time

from lssfl.common.config import RunConfig
from lssfl.common.seeding import derive_seed
from lssfl.proto import coordinator_pb2 as cpb


def _unix(deadline: float) -> float:
    """A monotonic deadline as wall-clock time, for the silo."""
    return time.time() + (deadline - time.monotonic())


class Tasks:
    """Builds TRAIN, EVALUATE, DONE and WAIT tasks of one run."""

    def __init__(self, cfg: RunConfig, run_id: str, uplink_codec: str, silo_eval: bool) -> None:
        """``silo_eval``: the silos evaluate (each task says how)."""
        self.run_id = run_id
        self.seed = cfg.run.seed
        self.uplink_codec = uplink_codec
        # Every task carries these; serialized once, not on each long poll.
        self.model_json = json.dumps(cfg.model_spec, sort_keys=True)
        self.trainer_json = json.dumps(cfg.trainer, sort_keys=True)
        self.evaluation_json = (
            json.dumps({"holdout": cfg.evaluation.holdout, "seed": cfg.run.seed})
            if silo_eval
            else ""
        )

    def train(self, round_num: int, silo_id: str, deadline: float) -> cpb.Task:
        """Train round ``round_num``'s model by monotonic ``deadline``."""
        return cpb.Task(
            kind=cpb.Task.TRAIN,
            run_id=self.run_id,
            round=round_num,
            seed=derive_seed(self.seed, round_num, silo_id),
            model_json=self.model_json,
            trainer_json=self.trainer_json,
            deadline_unix_s=_unix(deadline),
            uplink_codec=self.uplink_codec,
            evaluation_json=self.evaluation_json,
        )

    def evaluate(self, round_num: int, deadline: float) -> cpb.Task:
        """Measure the final model (round ``round_num``'s) by monotonic ``deadline``."""
        return cpb.Task(
            kind=cpb.Task.EVALUATE,
            run_id=self.run_id,
            round=round_num,
            model_json=self.model_json,
            deadline_unix_s=_unix(deadline),
            evaluation_json=self.evaluation_json,
        )

    def done(self, round_num: int) -> cpb.Task:
        """The run is over: the silo exits."""
        return cpb.Task(kind=cpb.Task.DONE, run_id=self.run_id, round=round_num)

    def wait(self, round_num: int) -> cpb.Task:
        """Nothing to do yet: ask again."""
        return cpb.Task(kind=cpb.Task.WAIT, run_id=self.run_id, round=round_num)
