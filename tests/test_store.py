"""RoundStore (lssfl.server.store): what it refuses to read back."""

import json
import sqlite3

import pytest
import torch

from lssfl.common.records import RoundRecord
from lssfl.server.store import RoundStore, StoreError

RECORD = {
    "round": 1, "algorithm": "fedavg", "status": "ok", "global_accuracy": 0.5,
    "global_loss": 1.0, "bytes_down": 0, "bytes_down_raw": 0, "bytes_down_payload": 0,
    "bytes_up": 0, "bytes_up_raw": 0, "bytes_up_payload": 0, "cum_bytes_down": 0,
    "cum_bytes_up": 0, "codec_down": "fp32", "codec_up": "fp32", "delta_downlink": False,
    "wall_seconds": 0.0, "num_results": 0, "missing": [], "late_refused": 0, "silos": [],
}  # fmt: skip


def test_a_round_from_another_version_is_one_line_naming_round_and_key(tmp_path):
    store = RoundStore(tmp_path)
    store.put(identity="{}")
    for r in (1, 2):
        store.commit_round({"w": torch.zeros(3)}, RoundRecord.from_dict(RECORD | {"round": r}))
    assert [r.round for r in store.records()] == [1, 2]
    store.close()

    # What an older build wrote: a record without a key this one has.
    old = {k: v for k, v in RECORD.items() if k != "codec_up"} | {"round": 2}
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE rounds SET record = ? WHERE round = 2", (json.dumps(old),))
    db.close()
    store = RoundStore(tmp_path)
    with pytest.raises(StoreError) as exc:
        store.records()
    message = str(exc.value)
    assert "round 2 is not a round record" in message and "missing key 'codec_up'" in message
    assert "\n" not in message and "state.db" in message
    store.close()
