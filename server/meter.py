"""Meter: serialized bytes of every message, per round, per silo, per direction.

Counted at the service boundary, where messages enter and leave: ``call`` for a unary RPC,
``sent`` around a download's pre-serialized stream, ``received`` around an upload's stream.
The state machine itself never counts.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.protobuf.message import Message as ProtoMessage

from lssfl.common.wire import Message, RawData, part_of, raw_fp32_bytes

DOWN, UP = "down", "up"

# A download: serialized once per round, with (serialized, raw fp32, payload) sizes.
Metered = list[tuple[bytes, tuple[int, int, int]]]


@dataclass
class Count:
    """Messages and bytes of one (round, silo, direction)."""

    messages: int = 0
    bytes: int = 0  # serialized protobuf bytes, as handed to gRPC
    raw: int = 0  # fp32 size of the tensors carried (what an uncompressed model costs)
    payload: int = 0  # encoded tensor bytes (after codecs), without protobuf framing


def message_sizes(msg: Message) -> tuple[int, int, int]:
    """Serialized, raw fp32 and encoded payload bytes of one stream message."""
    part, chunk = part_of(msg)
    if isinstance(chunk, RawData):
        return chunk.size, 0, len(chunk.data)
    size = chunk.ByteSize()
    if part == "tensor":
        return size, raw_fp32_bytes(chunk.tensor), 0
    if part == "data":
        return size, 0, len(chunk.data)
    return size, 0, 0


class Meter:
    """Byte counts per round, silo and direction, safe across gRPC threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, str, str], Count] = defaultdict(Count)

    def add(
        self,
        round_num: int,
        silo_id: str,
        direction: str,
        nbytes: int,
        raw: int = 0,
        payload: int = 0,
    ) -> None:
        """Count one message of ``nbytes`` serialized (``raw`` fp32, ``payload`` encoded)."""
        with self._lock:
            c = self._counts[(round_num, silo_id, direction)]
            c.messages += 1
            c.bytes += nbytes
            c.raw += raw
            c.payload += payload

    def get(self, round_num: int, silo_id: str, direction: str) -> Count:
        """A copy of the count (zeros when nothing was counted)."""
        with self._lock:
            c = self._counts.get((round_num, silo_id, direction), Count())
            return Count(c.messages, c.bytes, c.raw, c.payload)

    def silos(self, round_num: int) -> list[str]:
        """The silos with any traffic in the round."""
        with self._lock:
            return sorted({s for (r, s, _) in self._counts if r == round_num})

    def total(self, direction: str) -> int:
        """Serialized bytes of every round and silo in ``direction``."""
        with self._lock:
            return sum(c.bytes for (_, _, d), c in self._counts.items() if d == direction)

    def call(
        self, round_num: int, silo_id: str, request: ProtoMessage, reply: ProtoMessage
    ) -> None:
        """Count a unary call: its request up, its reply down."""
        self.add(round_num, silo_id, UP, request.ByteSize())
        self.add(round_num, silo_id, DOWN, reply.ByteSize())

    def sent(self, round_num: int, silo_id: str, messages: Metered) -> Iterator[bytes]:
        """Stream ``messages`` to ``silo_id``, counting each as it goes out."""
        for msg, sizes in messages:
            self.add(round_num, silo_id, DOWN, *sizes)
            yield msg

    def received(
        self, round_num: int, silo_id: str, messages: Iterable[Message]
    ) -> Iterator[Message]:
        """Pass on ``messages`` from ``silo_id``, counting each as it comes in."""
        for msg in messages:
            self.add(round_num, silo_id, UP, *message_sizes(msg))
            yield msg
