"""Seeds derived from (run seed, round, silo): a resumed run replays an uninterrupted one."""

from __future__ import annotations

import hashlib


def derive_seed(run_seed: int, round_num: int, silo_id: str) -> int:
    digest = hashlib.sha256(f"lssfl:{run_seed}:{round_num}:{silo_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
