"""Seeds derived by hashing names: stable across processes and Python versions (unlike
``hash()``), so a resumed run replays an uninterrupted one and generated data is the same
bytes everywhere."""

from __future__ import annotations

import hashlib


def seed_of(*parts: object) -> int:
    """A 63-bit seed from ``parts`` joined as text with ":" (SHA-256, first 8 bytes)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derive_seed(run_seed: int, round_num: int, silo_id: str) -> int:
    """The seed of one silo's work in one round of a run (``silo_id`` may also name a use of
    the coordinator's own, e.g. "selection")."""
    return seed_of("lssfl", run_seed, round_num, silo_id)
