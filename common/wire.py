"""The wire format: state dicts to and from streams of ``ModelChunk`` messages.

A stream is: one header (download or upload), then per tensor a ``TensorSpec`` followed by
data chunks of at most ``CHUNK_BYTES`` whose lengths add up to ``spec.nbytes``, then one
``StreamEnd`` with a checksum over every spec and data byte. Each tensor names its codec
(fp32, fp16, int8, top-k, zstd: ``lssfl.common.codecs``) and whether it is a delta to a
reference model the receiver holds. The decoder trusts nothing it reads: it checks every
length, shape and dtype against limits before allocating, verifies the checksum before
returning anything, and decodes through validating codecs. Nothing here unpickles.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import xxhash
from google.protobuf.message import DecodeError

from lssfl.common.codecs import (
    CodecError,
    CodecSpec,
    ErrorFeedback,
    decode_tensor,
    encode_tensor,
    max_encoded_bytes,
    parse_codec,
    payload_bytes,
    tensor_bytes,
)
from lssfl.proto import tensor_pb2 as pb

CHUNK_BYTES = 1 << 20
# gRPC's default receive limit is 4 MiB; a chunk plus its framing stays far below it.
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES
FP32 = CodecSpec()
# fp32 without a lossless stage goes out as "raw": every tensor at its own width, bit-exact,
# without a copy (float16 and float64 models included).
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


def checksum() -> xxhash.xxh3_128:
    """The stream checksum: XXH3-128 over every tensor's spec and data bytes, in stream order.

    It catches truncation, reordering and corruption, which is all a checksum inside an
    authenticated channel can do (whoever could alter the bytes could alter the digest too;
    TLS is what guards against that). XXH3 runs at memory speed, where SHA-256 took half as
    long as the transfer itself.
    """
    return xxhash.xxh3_128()


def _spec_key(spec: pb.TensorSpec) -> bytes:
    """What the checksum covers of a spec: its fields, spelled the same by every build."""
    fields = (spec.name, spec.dtype, list(spec.shape), spec.codec, spec.nbytes, spec.delta)
    return json.dumps(fields).encode()


def raw_fp32_bytes(spec: pb.TensorSpec) -> int:
    """What a tensor costs uncompressed: fp32 for floating tensors, own width otherwise.

    Unknown dtypes count as zero; the decoder rejects them anyway.
    """
    dtype = DTYPES.get(spec.dtype)
    if dtype is None:
        return 0
    width = 4 if dtype.is_floating_point else torch.empty((), dtype=dtype).element_size()
    return math.prod(spec.shape) * width


@dataclass
class WireTensor:
    """One tensor, encoded once, ready to be streamed to any number of receivers."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: str
    delta: bool
    data: bytes | memoryview

    def spec(self) -> pb.TensorSpec:
        """The ``TensorSpec`` message that announces this tensor in a stream."""
        return pb.TensorSpec(
            name=self.name,
            dtype=DTYPE_NAMES[self.dtype],
            shape=list(self.shape),
            codec=self.codec,
            nbytes=len(memoryview(self.data)),
            delta=self.delta,
        )


def pack_state(
    state: dict[str, torch.Tensor],
    spec: CodecSpec = FP32,
    reference: dict[str, torch.Tensor] | None = None,
    feedback: ErrorFeedback | None = None,
    exact: Collection[str] = frozenset(),
) -> list[WireTensor]:
    """Encode every tensor of ``state`` with ``spec``.

    With a ``reference`` (a model the receiver holds), floating tensors travel as
    ``state - reference``: updates are small and centred, which is what int8 and top-k need.
    ``feedback`` keeps what a lossy codec dropped and adds it to the next update (silo side).
    Integer buffers, and the floating tensors named in ``exact``, always travel whole and
    exact: BatchNorm's running statistics (``statistics_names``), which a lossy code of their
    update can make invalid (a negative variance, and every prediction NaN), cost a few
    hundred floats.
    """
    for name, t in state.items():
        if t.dtype not in DTYPE_NAMES:
            raise WireError(f"tensor {name!r}: dtype {t.dtype} cannot be sent")
    updates = {
        name: t.detach().cpu() - reference[name].to(t.dtype)
        for name, t in state.items()
        if reference is not None and t.is_floating_point() and name not in exact
    }
    try:
        payloads = (
            feedback.compress(updates, spec)
            if feedback is not None and updates
            else {n: encode_tensor(u, spec) for n, u in updates.items()}
        )
        out = []
        for name, t in state.items():
            if name in payloads:
                data: bytes | memoryview = payloads[name]
            elif spec == FP32 or name in exact:
                out.append(WireTensor(name, t.dtype, tuple(t.shape), RAW, False, tensor_bytes(t)))
                continue
            else:
                data = encode_tensor(t, spec)
            out.append(WireTensor(name, t.dtype, tuple(t.shape), spec.name, name in payloads, data))
    except CodecError as exc:
        raise WireError(str(exc)) from None
    return out


# A ModelChunk holding only `data` (field 4, length-delimited) is the bulk of every stream.
# Those are written and read here directly in protobuf's wire format: upb would copy each
# megabyte on every access and again on serialisation, which costs more than the transfer.
_DATA_TAG = b"\x22"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def data_message(piece: bytes | memoryview) -> bytes:
    """The serialized ModelChunk(data=piece), byte for byte what protobuf would write."""
    return b"".join((_DATA_TAG, _varint(len(piece)), piece))


class RawData(NamedTuple):
    """A data chunk read without protobuf: a view into the received message."""

    data: memoryview
    size: int  # serialized message bytes


Message = pb.ModelChunk | RawData | bytes
# What a sender yields: messages, and data chunks already serialized.
Outgoing = pb.ModelChunk | bytes


def parse_chunk(buf: bytes) -> pb.ModelChunk | RawData:
    """gRPC deserializer for ModelChunk streams: data chunks zero-copy, the rest by protobuf."""
    if buf[:1] == _DATA_TAG:
        length, shift, pos = 0, 0, 1
        while pos < len(buf) and pos <= 10:
            byte = buf[pos]
            length |= (byte & 0x7F) << shift
            shift += 7
            pos += 1
            if not byte & 0x80:
                if pos + length == len(buf):
                    return RawData(memoryview(buf)[pos:], len(buf))
                break
    try:
        return pb.ModelChunk.FromString(buf)
    except DecodeError as exc:
        raise WireError(f"undecodable message: {exc}") from None


def to_wire(msg: Outgoing) -> bytes:
    """gRPC serializer for ModelChunk streams: pre-serialized chunks pass through."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def part_of(msg: Message) -> tuple[str | None, pb.ModelChunk | RawData]:
    """Which part of the ``ModelChunk`` oneof a message holds, however it arrived."""
    if isinstance(msg, bytes):
        msg = parse_chunk(msg)
    if isinstance(msg, RawData):
        return "data", msg
    return msg.WhichOneof("part"), msg


def stream_tensors(tensors: list[WireTensor], header: pb.ModelChunk) -> Iterator[Outgoing]:
    """Yield the messages of one stream: ``header``, tensors, ``StreamEnd``.

    Data chunks come pre-serialized (bytes); serialize the rest with ``to_wire``.
    """
    yield header
    digest = checksum()
    payload = 0
    for t in tensors:
        buf = memoryview(t.data)
        spec = t.spec()
        digest.update(_spec_key(spec))
        yield pb.ModelChunk(tensor=spec)
        for start in range(0, len(buf), CHUNK_BYTES):
            piece = buf[start : start + CHUNK_BYTES]
            digest.update(piece)
            yield data_message(piece)
        payload += len(buf)
    yield pb.ModelChunk(
        end=pb.StreamEnd(checksum=digest.digest(), payload_bytes=payload, num_tensors=len(tensors))
    )


def encode_model(
    state: dict[str, torch.Tensor], header: pb.ModelChunk, spec: CodecSpec = FP32
) -> Iterator[Outgoing]:
    """A whole state dict as one stream (no reference: every tensor travels whole)."""
    return stream_tensors(pack_state(state, spec), header)


@dataclass
class DecodedModel:
    """A stream's header, its tensors, and the encoded bytes they came in."""

    header: pb.ModelChunk
    state: dict[str, torch.Tensor]
    payload_bytes: int


@functools.lru_cache(maxsize=64)
def _codec(name: str) -> CodecSpec:
    return parse_codec(name)


def _check_spec(
    spec: pb.TensorSpec,
    seen: dict[str, torch.Tensor],
    budget: int,
    like: Mapping[str, torch.Tensor] | None = None,
) -> CodecSpec | None:
    """The tensor's codec (None: raw), after checking the spec against every limit (and
    against the tensor of that name in ``like``, when given), before any of its data."""
    where = f"tensor {spec.name[:100]!r}"
    if not spec.name:
        raise WireError("tensor with an empty name")
    if spec.name in seen:
        raise WireError(f"{where} sent twice")
    if spec.dtype not in DTYPES:
        raise WireError(f"{where}: unknown dtype {spec.dtype[:32]!r}")
    if like is not None:
        ref = like.get(spec.name)
        if ref is None:
            raise WireError(f"unknown {where}: not in the model")
        if tuple(spec.shape) != tuple(ref.shape):
            raise WireError(
                f"{where} announced with shape {list(spec.shape)[:8]}, expected {list(ref.shape)}"
            )
        if DTYPES[spec.dtype] != ref.dtype:
            raise WireError(f"{where} announced with dtype {spec.dtype}, expected {ref.dtype}")
    try:
        codec = None if spec.codec == RAW else _codec(spec.codec)
    except CodecError as exc:
        raise WireError(f"{where}: {exc}") from None
    if len(spec.shape) > 8 or any(d < 0 for d in spec.shape):
        raise WireError(f"{where}: invalid shape {list(spec.shape)}")
    dtype = DTYPES[spec.dtype]
    if codec is None or codec.lossless is None:
        shape = tuple(spec.shape)
        expected = (
            math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if codec is None
            else payload_bytes(codec, shape, dtype)
        )
        if spec.nbytes != expected:
            raise WireError(
                f"{where}: {spec.nbytes} bytes announced, {spec.codec} of shape "
                f"{list(spec.shape)} {spec.dtype} needs {expected}"
            )
    elif spec.nbytes > max_encoded_bytes(codec, tuple(spec.shape), dtype):
        raise WireError(f"{where}: {spec.nbytes} bytes announced, more than its codec can need")
    if spec.nbytes > budget:
        raise WireError(f"{where}: stream exceeds the size limit")
    return codec


def _decode_tensor(
    spec: pb.TensorSpec,
    codec: CodecSpec | None,
    buf: torch.Tensor,
    reference: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    dtype, shape = DTYPES[spec.dtype], tuple(spec.shape)
    if codec is None:
        value = buf.view(dtype).reshape(shape)  # the received bytes, no copy
    else:
        try:
            value = decode_tensor(buf.numpy().data, codec, shape, dtype)
        except CodecError as exc:
            raise WireError(f"tensor {spec.name!r}: {exc}") from None
    if not spec.delta:
        return value
    ref = None if reference is None else reference.get(spec.name)
    if ref is None or ref.shape != value.shape or ref.dtype != dtype or not dtype.is_floating_point:
        raise WireError(f"tensor {spec.name!r}: a delta without a matching reference")
    return ref + value


def held_state(
    tensors: list[WireTensor], reference: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """What a receiver holds after decoding ``tensors`` (against ``reference`` for deltas):
    the encoder's view of its own lossy output, without a stream to parse."""
    held = {}
    for t in tensors:
        spec = t.spec()
        codec = None if spec.codec == RAW else _codec(spec.codec)
        buf = torch.empty(spec.nbytes, dtype=torch.uint8)  # a copy, as a receiver has
        buf.numpy()[:] = np.frombuffer(t.data, dtype=np.uint8)
        held[t.name] = _decode_tensor(spec, codec, buf, reference)
    return held


def read_header(messages: Iterator[Message], kind: str) -> pb.ModelChunk:
    """Take a stream's first message, which must be its ``kind`` ("download" or "upload")
    header; WireError otherwise. The rest of ``messages`` goes to ``decode_after_header``."""
    first = next(messages, None)
    part, header = part_of(first) if first is not None else (None, None)
    if part != kind or not isinstance(header, pb.ModelChunk):
        raise WireError(f"stream must start with a {kind} header")
    return header


def decode_model(
    chunks: Iterable[Message],
    *,
    header_kind: str,
    max_payload_bytes: int,
    reference: dict[str, torch.Tensor] | None = None,
) -> DecodedModel:
    """Rebuild a state dict from a whole stream, validating everything.

    ``header_kind`` is "download" or "upload": the first message must be that header.
    Delta tensors are added to ``reference``. Raises WireError on anything malformed,
    truncated or corrupted.
    """
    it = iter(chunks)
    header = read_header(it, header_kind)
    return decode_after_header(header, it, max_payload_bytes=max_payload_bytes, reference=reference)


def decode_after_header(
    header: pb.ModelChunk,
    it: Iterator[Message],
    *,
    max_payload_bytes: int,
    reference: dict[str, torch.Tensor] | None = None,
    like: Mapping[str, torch.Tensor] | None = None,
) -> DecodedModel:
    """``decode_model`` for a stream whose header ``read_header`` has already taken. With
    ``like``, each tensor's spec must name a tensor of ``like`` with its shape and dtype:
    anything else is refused before a byte of its data is read."""
    state: dict[str, torch.Tensor] = {}
    digest = checksum()
    payload = 0
    spec: pb.TensorSpec | None = None
    codec: CodecSpec | None = None
    buf = torch.empty(0, dtype=torch.uint8)
    dest = buf.numpy()
    filled = 0

    def finish_tensor() -> None:
        if spec is None:
            return
        if filled != spec.nbytes:
            raise WireError(f"tensor {spec.name!r}: got {filled} of {spec.nbytes} bytes")
        state[spec.name] = _decode_tensor(spec, codec, buf, reference)

    for raw_msg in it:
        part, msg = part_of(raw_msg)
        if part == "tensor" and isinstance(msg, pb.ModelChunk):
            finish_tensor()
            spec = msg.tensor
            codec = _check_spec(spec, state, max_payload_bytes - payload, like)
            digest.update(_spec_key(spec))
            # Uninitialised: every byte is written below before anything reads it.
            buf, filled = torch.empty(spec.nbytes, dtype=torch.uint8), 0
            dest = buf.numpy()
            payload += spec.nbytes
        elif part == "data":
            if spec is None:
                raise WireError("data before any tensor header")
            piece = msg.data
            if filled + len(piece) > spec.nbytes:
                raise WireError(f"tensor {spec.name!r}: more than {spec.nbytes} bytes")
            dest[filled : filled + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            digest.update(piece)
            filled += len(piece)
        elif part == "end" and isinstance(msg, pb.ModelChunk):
            end = msg.end
            if spec is not None and filled != spec.nbytes:
                raise WireError(f"tensor {spec.name!r}: got {filled} of {spec.nbytes} bytes")
            if not end.checksum:
                # Builds before XXH3 sent a SHA-256 in field 1, which this one does not read.
                raise WireError("stream end carries no checksum: is the peer an older build?")
            if end.checksum != digest.digest():
                raise WireError("checksum mismatch: the payload was corrupted in transit")
            finish_tensor()
            if end.num_tensors != len(state) or end.payload_bytes != payload:
                raise WireError(
                    f"stream end announces {end.num_tensors} tensors / {end.payload_bytes} "
                    f"bytes, received {len(state)} / {payload}"
                )
            if next(it, None) is not None:
                raise WireError("messages after the end of the stream")
            return DecodedModel(header=header, state=state, payload_bytes=payload)
        else:
            raise WireError(f"unexpected {part or 'empty'} message inside a stream")
    raise WireError("stream truncated: no end marker")
