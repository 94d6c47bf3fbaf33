"""The downlink: each round's model encoded once, and what the silos hold after it.

A round's download is encoded once and streamed as the same bytes to every silo: in full,
and with ``delta_downlink`` also as a change against the previous round's model for the
silos that hold it. Under a lossy downlink codec silos hold the decoded model, not the
global one: uploads are decoded against ``held``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from lssfl.common.codecs import CodecSpec
from lssfl.common.models import build_model, statistics_names
from lssfl.common.pipeline import DownlinkEncoder
from lssfl.common.wire import WireTensor, pack_state, stream_tensors, to_wire
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.meter import Metered, message_sizes
from lssfl.server.store import RoundStore

log = logging.getLogger("lssfl.coordinator")


@dataclass
class Download:
    """One round's downlink, encoded once and streamed as the same bytes to every silo."""

    full: Metered = field(default_factory=list)
    delta: Metered | None = None  # for silos that hold the previous round's model
    base_round: int = -1

    def for_silo(self, have_round: int | None) -> Metered:
        """The messages for a silo holding ``have_round``'s model (None: none)."""
        if self.delta is not None and have_round == self.base_round:
            return self.delta
        return self.full


def _metered(tensors: list[WireTensor], header: pb.ModelChunk) -> Metered:
    return [(to_wire(m), message_sizes(m)) for m in stream_tensors(tensors, header)]


def _header(run_id: str, round_num: int) -> pb.ModelChunk:
    return pb.ModelChunk(download=pb.DownloadHeader(run_id=run_id, round=round_num))


class Downlink:
    """Encodes each round's download and keeps what the silos hold after it."""

    def __init__(
        self, run_id: str, codec: CodecSpec, delta: bool, exact: frozenset[str] = frozenset()
    ) -> None:
        """``exact``: tensors sent exactly under a lossy codec (BatchNorm statistics, as the
        silos send them)."""
        self.run_id = run_id
        self.delta = delta
        # Owns what silos hold after the last prepared download (None before the first).
        self.encoder = DownlinkEncoder(codec, delta=delta, exact=exact)

    @property
    def held(self) -> dict[str, torch.Tensor] | None:
        """What the silos hold after the last prepared download; uploads decode against it."""
        return self.encoder.held

    def prepare(self, round_num: int, global_state: dict[str, torch.Tensor]) -> Download:
        """Encode ``round_num``'s model once (rounds come in order), and fix what silos
        will hold after it."""
        encoded = self.encoder.encode(global_state)
        header = _header(self.run_id, round_num)
        if encoded.delta is None:
            return Download(_metered(encoded.full, header))
        dheader = pb.ModelChunk()
        dheader.CopyFrom(header)
        dheader.download.base_round = round_num - 1
        return Download(
            _metered(encoded.full, header), _metered(encoded.delta, dheader), round_num - 1
        )

    def final(self, round_num: int, global_state: dict[str, torch.Tensor]) -> Download:
        """The final model for the silos to evaluate: always exact fp32 (not delta, not
        lossy), the model final_model.safetensors holds. What silos hold is left as it is."""
        return Download(_metered(pack_state(global_state), _header(self.run_id, round_num)))

    def to_store(self) -> dict[str, torch.Tensor] | None:
        """What to store with the round just committed: with a delta downlink the next
        round is encoded against it, so a resumed run sends the same bytes."""
        return self.held if self.delta else None

    def restore(self, store: RoundStore, round_num: int) -> None:
        """Take back what silos held after committed round ``round_num`` (a resumed run)."""
        if self.delta:
            self.encoder.held = store.held_model(round_num)


def statistics_names_of(model_spec: dict[str, Any]) -> frozenset[str]:
    """The model's floating buffers, from a model built on the meta device (nothing
    allocated); none when a site's builder cannot build there."""
    try:
        with torch.device("meta"):
            return statistics_names(build_model(model_spec))
    except Exception:  # a site's builder may load files or refuse the meta device
        log.debug("model built on the meta device failed", exc_info=True)
        return frozenset()
