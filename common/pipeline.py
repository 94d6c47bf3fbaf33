"""The codec pipeline of each direction, one object per end that owns its state.

As a DDP communication hook packages a compressor with its error feedback, each object here
packages a codec with what it must remember between rounds:

- ``UplinkEncoder`` (silo): the update against the model received this round, top-k's
  residuals carried to the next round (error feedback), BatchNorm statistics sent exact.
- ``DownlinkEncoder`` (coordinator): the round's model in full, and as a change against what
  the silos hold (``delta_downlink``); it keeps what they will hold after decoding.
- ``HeldModel`` (silo): the model held from the previous download, the base of a delta.

Every stream is ``lssfl.common.wire.pack_state`` output; these objects only choose its
arguments, so the bytes are those the code before them sent.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch

from lssfl.common.codecs import CodecSpec, ErrorFeedback
from lssfl.common.wire import (
    FP32,
    DecodedModel,
    Message,
    WireError,
    WireTensor,
    decode_model,
    held_state,
    pack_state,
)

State = dict[str, torch.Tensor]


class UplinkEncoder:
    """A silo's upload: the trained model, whole under fp32, else as its change from the
    model received (small, centred values), with top-k's error feedback across rounds."""

    def __init__(self) -> None:
        self.feedback = ErrorFeedback()

    def encode(
        self,
        state: State,
        codec: CodecSpec,
        *,
        received: State,
        exact: Collection[str],
        round_num: int,
    ) -> list[WireTensor]:
        """``state`` as the upload of round ``round_num`` under ``codec``; ``exact``: the
        floating tensors sent whole (``statistics_names``). Top-k adds what it dropped last
        round and keeps what it drops now; a round encoded again starts from the same
        residuals as its first try."""
        if codec == FP32:
            return pack_state(state)
        feedback = self.feedback if codec.topk is not None else None
        if feedback is not None:
            feedback.start_round(round_num)
        return pack_state(state, codec, received, feedback, exact=exact)


@dataclass
class Downlink:
    """One round's model as the coordinator sends it: ``full`` to any silo, ``delta`` (or
    None) to a silo holding the previous round's ``held``; both decode to ``held``."""

    full: list[WireTensor]
    delta: list[WireTensor] | None
    held: State


class DownlinkEncoder:
    """The coordinator's download: ``codec`` (lossy codecs send ``exact`` whole), in full or,
    with ``delta``, as the change against what the silos hold (``held``, None before the
    first round; a resumed run sets it from its store)."""

    def __init__(self, codec: CodecSpec, *, delta: bool, exact: Collection[str]) -> None:
        self.codec = codec
        self.delta = delta
        self.exact = exact
        self.held: State | None = None

    def encode(self, state: State) -> Downlink:
        """``state`` encoded once for the round; ``held`` becomes what silos will hold."""
        previous = self.held  # rounds run in order: this is the previous round's
        if self.delta and previous is not None:
            delta = pack_state(state, self.codec, previous, exact=self.exact)
            # What the silos will decode, so that both sides hold the same bytes; silos
            # without last round's model get exactly that, in full.
            held = held_state(delta, previous)
            out = Downlink(pack_state(held), delta, held)
        elif self.delta or self.codec == FP32:
            out = Downlink(pack_state(state), None, state)
        else:
            full = pack_state(state, self.codec, exact=self.exact)
            out = Downlink(full, None, held_state(full))
        self.held = out.held
        return out


class HeldModel:
    """A silo's side of the download: the model it holds from the last round it kept, which
    the coordinator may send the next one as a change to."""

    def __init__(self) -> None:
        self.round: int | None = None
        self.state: State | None = None

    def base_round(self, keep: bool) -> int | None:
        """The round to ask a delta against (None: send the whole model). ``keep``: this
        download will be held; one that will not (the final evaluation) is asked whole."""
        return self.round if keep and self.state is not None else None

    def decode(
        self, messages: Iterable[Message], *, round_num: int, keep: bool, max_payload_bytes: int
    ) -> DecodedModel:
        """Decode round ``round_num``'s download (a delta against what we hold, if so sent);
        hold it when ``keep``. WireError for a delta against a round we do not hold."""
        base = self.base_round(keep)
        received = decode_model(
            messages,
            header_kind="download",
            max_payload_bytes=max_payload_bytes,
            reference=self.state if base is not None else None,
        )
        head = received.header.download
        if head.HasField("base_round") and head.base_round != base:
            raise WireError(f"delta against round {head.base_round}, we hold {base}")
        if keep:
            self.round, self.state = round_num, received.state
        return received

    def forget(self) -> None:
        """Drop the held model: the next download comes whole."""
        self.round, self.state = None, None
