"""TensorCodec: state dicts to and from streams of ``ModelChunk`` messages.

A stream is: one header (download or upload), then per tensor a ``TensorSpec`` followed by
data chunks of at most ``CHUNK_BYTES`` whose lengths add up to ``spec.nbytes``, then one
``StreamEnd`` with a SHA-256 over every data byte. The decoder trusts nothing it reads: it
checks every length, shape and dtype against limits before allocating, and only hands out
tensors once the checksum matches. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from lssfl.proto import tensor_pb2 as pb

CHUNK_BYTES = 1 << 20
# gRPC's default receive limit is 4 MiB; a chunk plus its framing stays far below it.
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES
RAW = "raw"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A stream that does not decode: the message says what and where."""


def raw_fp32_bytes(spec: pb.TensorSpec) -> int:
    """What a tensor costs uncompressed: fp32 for floating tensors, own width otherwise.

    Unknown dtypes count as zero; the decoder rejects them anyway.
    """
    dtype = DTYPES.get(spec.dtype)
    if dtype is None:
        return 0
    width = 4 if dtype.is_floating_point else torch.empty((), dtype=dtype).element_size()
    return math.prod(spec.shape) * width


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in DTYPE_NAMES:
        raise WireError(f"dtype {t.dtype} cannot be sent")
    # A uint8 view works for every dtype, bfloat16 included, without copying.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_model(state: dict[str, torch.Tensor], header: pb.ModelChunk) -> Iterator[pb.ModelChunk]:
    """Yield the messages of one stream: ``header``, tensors, ``StreamEnd``."""
    yield header
    digest = hashlib.sha256()
    payload = 0
    for name, tensor in state.items():
        buf = _tensor_bytes(tensor)
        yield pb.ModelChunk(
            tensor=pb.TensorSpec(
                name=name,
                dtype=DTYPE_NAMES[tensor.dtype],
                shape=list(tensor.shape),
                codec=RAW,
                nbytes=len(buf),
            )
        )
        for start in range(0, len(buf), CHUNK_BYTES):
            piece = bytes(buf[start : start + CHUNK_BYTES])
            digest.update(piece)
            yield pb.ModelChunk(data=piece)
        payload += len(buf)
    yield pb.ModelChunk(
        end=pb.StreamEnd(sha256=digest.digest(), payload_bytes=payload, num_tensors=len(state))
    )


@dataclass
class DecodedModel:
    header: pb.ModelChunk
    state: dict[str, torch.Tensor]
    payload_bytes: int


def _check_spec(spec: pb.TensorSpec, seen: dict[str, torch.Tensor], budget: int) -> torch.dtype:
    where = f"tensor {spec.name!r}"
    if not spec.name:
        raise WireError("tensor with an empty name")
    if spec.name in seen:
        raise WireError(f"{where} sent twice")
    if spec.dtype not in DTYPES:
        raise WireError(f"{where}: unknown dtype {spec.dtype!r}")
    if spec.codec != RAW:
        raise WireError(f"{where}: unknown codec {spec.codec!r}")
    if len(spec.shape) > 8 or any(d < 0 for d in spec.shape):
        raise WireError(f"{where}: invalid shape {list(spec.shape)}")
    dtype = DTYPES[spec.dtype]
    expected = math.prod(spec.shape) * torch.empty((), dtype=dtype).element_size()
    if spec.nbytes != expected:
        raise WireError(
            f"{where}: {spec.nbytes} bytes announced, shape {list(spec.shape)} {spec.dtype} "
            f"needs {expected}"
        )
    if spec.nbytes > budget:
        raise WireError(f"{where}: stream exceeds the size limit")
    return dtype


def decode_model(
    chunks: Iterable[pb.ModelChunk], *, header_kind: str, max_payload_bytes: int
) -> DecodedModel:
    """Rebuild a state dict from a stream, validating everything.

    ``header_kind`` is "download" or "upload": the first message must be that header.
    Raises WireError on anything malformed, truncated or corrupted.
    """
    it = iter(chunks)
    header = next(it, None)
    if header is None or header.WhichOneof("part") != header_kind:
        raise WireError(f"stream must start with a {header_kind} header")
    state: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    payload = 0
    spec: pb.TensorSpec | None = None
    dtype = torch.uint8
    buf = bytearray()
    filled = 0

    def finish_tensor() -> None:
        if spec is None:
            return
        if filled != spec.nbytes:
            raise WireError(f"tensor {spec.name!r}: got {filled} of {spec.nbytes} bytes")
        flat = torch.frombuffer(buf, dtype=dtype) if spec.nbytes else torch.empty(0, dtype=dtype)
        state[spec.name] = flat.reshape(tuple(spec.shape))

    for msg in it:
        part = msg.WhichOneof("part")
        if part == "tensor":
            finish_tensor()
            spec = msg.tensor
            dtype = _check_spec(spec, state, max_payload_bytes - payload)
            buf, filled = bytearray(spec.nbytes), 0
            payload += spec.nbytes
        elif part == "data":
            if spec is None:
                raise WireError("data before any tensor header")
            piece = msg.data
            if filled + len(piece) > spec.nbytes:
                raise WireError(f"tensor {spec.name!r}: more than {spec.nbytes} bytes")
            buf[filled : filled + len(piece)] = piece
            filled += len(piece)
            digest.update(piece)
        elif part == "end":
            finish_tensor()
            end = msg.end
            if end.num_tensors != len(state) or end.payload_bytes != payload:
                raise WireError(
                    f"stream end announces {end.num_tensors} tensors / {end.payload_bytes} "
                    f"bytes, received {len(state)} / {payload}"
                )
            if end.sha256 != digest.digest():
                raise WireError("checksum mismatch: the payload was corrupted in transit")
            if next(it, None) is not None:
                raise WireError("messages after the end of the stream")
            return DecodedModel(header=header, state=state, payload_bytes=payload)
        else:
            raise WireError(f"unexpected {part or 'empty'} message inside a stream")
    raise WireError("stream truncated: no end marker")
