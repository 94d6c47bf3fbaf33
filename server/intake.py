"""Reading one silo's upload: decode the stream after its header and check what it holds.

Refusals are logged here, with the round and silo, and raised as ``Refused``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lssfl.common.records import SiloEvaluation
from lssfl.common.wire import Message, WireError, decode_after_header
from lssfl.proto import tensor_pb2 as pb
from lssfl.server import admission
from lssfl.server.admission import Refusal, RefusalKind, Refused

log = logging.getLogger("lssfl.coordinator")


@dataclass(frozen=True)
class UploadBounds:
    """What an upload may be: its encoded size, its distance to the round's model, and
    whether it may carry the silo's evaluation."""

    max_payload_bytes: int
    max_update_norm: float | None  # None: no bound
    silo_eval: bool


@dataclass
class Upload:
    """A decoded upload that passed every check."""

    state: dict[str, torch.Tensor]
    evaluation: SiloEvaluation | None
    payload_bytes: int


def _reject(head: pb.UploadHeader, refusal: Refusal | None) -> None:
    """Log and raise ``refusal`` of an upload, when there is one."""
    if refusal is not None:
        log.warning(
            "round=%d silo=%s rejected upload: %s", head.round, head.silo_id, refusal.message
        )
        raise Refused(refusal)


def read_upload(
    header: pb.ModelChunk,
    stream: Iterator[Message],
    declared: int,
    reference: dict[str, torch.Tensor] | None,
    like: dict[str, torch.Tensor],
    bounds: UploadBounds,
) -> Upload:
    """The upload ``header`` announces, decoded from ``stream`` against ``reference`` (what
    the silo holds; None: the global model ``like``) and checked: its shape, its weight
    against the ``declared`` sample count, its metrics, its update norm and evaluation."""
    head = header.upload
    try:
        decoded = decode_after_header(
            header,
            stream,
            max_payload_bytes=bounds.max_payload_bytes,
            reference=reference,
            like=like,
        )
    except WireError as exc:
        log.warning("round=%d silo=%s rejected upload: %s", head.round, head.silo_id, exc)
        raise Refused(Refusal(RefusalKind.INVALID, f"bad upload stream: {exc}")) from None
    base = reference if reference is not None else like
    _reject(
        head,
        admission.check_upload_state(decoded.state, like)
        or admission.check_weight(head.num_samples, declared, head.metrics)
        or admission.check_update_norm(decoded.state, base, bounds.max_update_norm),
    )
    evaluation = (
        checked_evaluation(head.silo_id, head.round, head.evaluation, declared)
        if bounds.silo_eval and head.HasField("evaluation")
        else None
    )
    return Upload(decoded.state, evaluation, decoded.payload_bytes)


def checked_evaluation(
    silo: str, round_num: int, ev: pb.Evaluation, declared: int
) -> SiloEvaluation:
    """A silo's evaluation, bounded (``admission.check_evaluation``); Refused otherwise."""
    refusal = admission.check_evaluation(ev.loss, ev.accuracy, ev.num_samples, declared)
    if refusal is not None:
        log.warning("round=%d silo=%s rejected evaluation: %s", round_num, silo, refusal.message)
        raise Refused(refusal)
    return SiloEvaluation(silo, ev.accuracy, ev.loss, int(ev.num_samples))
