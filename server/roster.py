"""The joined silos: who each is, what it declared, when it was last heard from.

Not locked itself: the coordinator calls it holding its own lock.
"""

from __future__ import annotations

import logging
import time

from lssfl.common.peertext import peer_text
from lssfl.server import admission
from lssfl.server.admission import RefusalKind, Refused
from lssfl.server.results import SiloInfo

log = logging.getLogger("lssfl.coordinator")
# Heartbeat intervals a silo may miss before it counts as gone (plus a 2 s allowance).
MISSED_BEATS = 3


class Roster:
    """The silos that joined this process, out of the enrolled ones."""

    def __init__(self, enrolled: list[str], heartbeat_interval_s: float) -> None:
        self.enrolled = enrolled
        self.heartbeat_interval_s = heartbeat_interval_s
        self.silos: dict[str, SiloInfo] = {}

    def touch(self, silo_id: str) -> SiloInfo:
        """The calling silo, noted alive; Refused when unknown or not joined."""
        info = self.silos.get(silo_id)
        if info is None:
            refusal = admission.check_identity(silo_id, silo_id in self.enrolled, False)
            assert refusal is not None  # a silo that has not joined
            if refusal.kind is RefusalKind.PERMISSION:
                log.warning("refused unknown silo %r", peer_text(silo_id))
            raise Refused(refusal)
        info.last_seen = time.monotonic()
        return info

    def enrol(self, silo_id: str, num_samples: int, device: str) -> bool:
        """Note ``silo_id`` joined (again); whether it had joined before."""
        rejoin = silo_id in self.silos
        self.silos[silo_id] = SiloInfo(silo_id, num_samples, device, time.monotonic())
        return rejoin

    def silent_after(self) -> float:
        """Seconds without a call after which a silo counts as gone."""
        return MISSED_BEATS * self.heartbeat_interval_s + 2.0

    def alive(self, now: float) -> list[str]:
        """The joined silos heard from recently, sorted."""
        timeout = self.silent_after()
        return sorted(s for s, i in self.silos.items() if now - i.last_seen <= timeout)

    def declared(self) -> dict[str, int]:
        """Each joined silo's sample count, as declared at Join."""
        return {s: info.num_samples for s, info in self.silos.items()}
