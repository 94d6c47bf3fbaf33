"""Tensor codecs: lossy value codecs, top-k sparsification and a lossless stage.

A codec is named by a string such as ``int8``, ``int8+zstd`` or ``topk0.01+int8+zstd``:
an optional ``topk<fraction>``, one value codec (``fp32`` alias ``raw``, ``fp16``, ``bf16``,
``int8``) and an optional lossless stage (``zstd`` level 3, ``zlib`` level 6). Encoding one
tensor gives one payload; the receiver needs the codec, shape and dtype (the ``TensorSpec``)
to decode it. All multi-byte fields are little-endian (the host byte order torch uses here).

Payload of a floating tensor with n elements, before the lossless stage:

* ``fp32`` / ``fp16`` / ``bf16``: n values in that format, row-major.
* ``int8``: C float32 minima, C float32 scales, then n uint8 codes, row-major; value =
  min[c] + scale[c] * code. C = shape[0] for rank >= 2 (one group per output channel, each
  numel / C consecutive codes), 1 for rank 0 and 1, 0 for empty tensors.
* ``topk<f>+V``: k uint32 indices into the flattened tensor, strictly increasing, then the
  ``V`` payload of the k kept values as a rank-1 tensor (so ``int8`` is per tensor there);
  k = max(1, ceil(f * n)) with f read as the decimal it is written as, 0 when n == 0.
  Entries not listed decode to zero.

Integer and bool tensors always travel as their raw bytes, whatever the value codec or top-k
says; only the lossless stage applies to them. With a lossless stage the whole payload above
is one zstd frame (content size in the header, no checksum) or one zlib stream.

Decoding trusts nothing: the exact payload length follows from codec, shape and dtype and is
checked (after bounded decompression) before anything is allocated from it; every scale,
index and value is validated, and any failure is a ``CodecError``. Nothing here unpickles.
"""

from __future__ import annotations

import math
import re
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import torch
import zstandard

VALUE_CODECS = ("fp32", "fp16", "bf16", "int8")
LOSSLESS_CODECS = ("zstd", "zlib")
ZSTD_LEVEL = 3
ZLIB_LEVEL = 6

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EXACT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)

_CAST = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_F32 = torch.finfo(torch.float32)
# Indices travel as uint32; larger tensors cannot be sparsified in this format.
_MAX_TOPK_NUMEL = 1 << 32
_LEVELS = 255
_NAN_MESSAGE = "tensor holds NaN or infinite values"


class CodecError(ValueError):
    """A codec string, tensor or payload that cannot be handled: the message says why."""


_TOPK = r"topk(?P<topk>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\+"
_CODEC_RE = re.compile(
    rf"(?:{_TOPK})?(?P<values>fp32|fp16|bf16|int8|raw)(?:\+(?P<lossless>zstd|zlib))?"
)


@dataclass(frozen=True)
class CodecSpec:
    """What a tensor is encoded with; ``name`` is the canonical string (``parse_codec``)."""

    values: str = "fp32"
    topk: float | None = None
    lossless: str | None = None

    def __post_init__(self) -> None:
        if self.values not in VALUE_CODECS:
            raise CodecError(f"unknown value codec {self.values!r}")
        if self.topk is not None:
            ok = isinstance(self.topk, int | float) and not isinstance(self.topk, bool)
            if not ok or not (math.isfinite(self.topk) and 0 < self.topk <= 1):
                raise CodecError(f"topk must be a fraction in (0, 1], got {self.topk!r}")
            object.__setattr__(self, "topk", float(self.topk))
        if self.lossless is not None and self.lossless not in LOSSLESS_CODECS:
            raise CodecError(f"unknown lossless codec {self.lossless!r}")

    @property
    def name(self) -> str:
        """The codec's canonical text, e.g. ``topk0.01+int8+zstd``."""
        parts = [] if self.topk is None else [f"topk{self.topk!r}"]
        parts.append(self.values)
        if self.lossless is not None:
            parts.append(self.lossless)
        return "+".join(parts)


def parse_codec(text: str) -> CodecSpec:
    """``[topk<fraction>+]{fp32|raw|fp16|bf16|int8}[+zstd|+zlib]`` to a ``CodecSpec``."""
    match = _CODEC_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        shown = text[:80] if isinstance(text, str) else text
        raise CodecError(
            f"unknown codec {shown!r}: expected [topk<fraction>+]fp32|fp16|bf16|int8[+zstd|+zlib]"
        )
    values = "fp32" if match["values"] == "raw" else match["values"]
    topk = None if match["topk"] is None else float(match["topk"])
    try:
        return CodecSpec(values=values, topk=topk, lossless=match["lossless"])
    except CodecError as exc:
        raise CodecError(f"codec {text!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Sizes: everything the decoder may read follows from (spec, shape, dtype) alone.


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise CodecError(f"invalid shape {shape!r}") from None
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise CodecError(f"invalid shape {list(dims)!r}")
    return dims


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES and dtype not in EXACT_DTYPES:
        raise CodecError(f"dtype {dtype} is not supported")


def _groups(shape: tuple[int, ...]) -> int:
    """int8 quantisation groups: output channels for weights, one for vectors and scalars."""
    if math.prod(shape) == 0:
        return 0
    return shape[0] if len(shape) >= 2 else 1


def _values_bytes(values: str, shape: tuple[int, ...]) -> int:
    numel = math.prod(shape)
    if values == "int8":
        return 8 * _groups(shape) + numel
    return numel * _CAST[values].itemsize


def topk_count(fraction: float, numel: int) -> int:
    """Entries kept of ``numel``: ceil over the decimal fraction, so 0.07 * 100 keeps 7."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(Decimal(repr(fraction)) * numel)))


def payload_bytes(spec: CodecSpec, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Exact length of the payload before the lossless stage."""
    dims = _check_shape(shape)
    _check_dtype(dtype)
    numel = math.prod(dims)
    if not dtype.is_floating_point:
        return numel * dtype.itemsize
    if spec.topk is None:
        return _values_bytes(spec.values, dims)
    k = topk_count(spec.topk, numel)
    return 4 * k + _values_bytes(spec.values, (k,))


def _compress_bound(method: str, size: int) -> int:
    if method == "zstd":  # ZSTD_COMPRESSBOUND
        small = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
        return size + (size >> 8) + small
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 13  # zlib compressBound


def max_encoded_bytes(spec: CodecSpec, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Upper bound on ``len(encode_tensor(t, spec))`` for any such tensor."""
    size = payload_bytes(spec, shape, dtype)
    return size if spec.lossless is None else _compress_bound(spec.lossless, size)


# ---------------------------------------------------------------------------------------------
# Encoding.


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as stored (on the CPU, contiguous), without a copy when it is."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:  # empty tensors may carry zero strides, which view() refuses
        return memoryview(b"")
    # A uint8 view covers every dtype, bfloat16 and bool included, without a copy.
    return t.reshape(-1).view(torch.uint8).numpy().data


def _limit(dtype: torch.dtype) -> float:
    """Largest magnitude a decoded value may have; float64 is decoded through float32."""
    return float(torch.finfo(torch.float32 if dtype == torch.float64 else dtype).max)


def _int8_params_ok(lo: np.ndarray, scale: np.ndarray, limit: float) -> bool:
    """Minima and scales whose every code decodes to a finite value within ``limit``."""
    # Hostile bytes may hold signalling NaNs: no floating-point warnings, just a verdict.
    with np.errstate(all="ignore"):
        lo64, scale64 = lo.astype(np.float64), scale.astype(np.float64)
        # Every comparison is False for NaN, and an infinite minimum or scale fails ``top``.
        top = lo64 + _LEVELS * scale64
        return bool(np.all((scale64 >= 0) & (lo64 >= -limit) & (top <= limit)))


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy view of a CPU tensor; bfloat16, which numpy lacks, as a float32 copy.

    The bulk arithmetic runs in numpy on purpose: numpy is single-threaded, whereas torch's
    intra-op threads collapse when the process shares its cores (measured: 20x slower with 2
    threads on a loaded 2-core machine), and numpy is as fast as one torch thread.
    """
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _extremes(t: torch.Tensor) -> tuple[float, float]:
    """Minimum and maximum of a non-empty tensor; NaN propagates into both."""
    flat = _as_numpy(t).reshape(-1)
    return float(flat.min()), float(flat.max())


def _finite_extremes(t: torch.Tensor) -> tuple[float, float]:
    lo, hi = _extremes(t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CodecError(_NAN_MESSAGE)
    return lo, hi


def _encode_int8(x: torch.Tensor, groups: int, limit: float) -> bytes:
    numel = x.numel()
    rows = _as_numpy(x).reshape(groups, -1)
    # min and max propagate NaN, so the per-channel extremes cover every element.
    lo = rows.min(axis=1).astype(np.float64)
    hi = rows.max(axis=1).astype(np.float64)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise CodecError(_NAN_MESSAGE)
    if lo.min() < -_F32.max or hi.max() > _F32.max:
        raise CodecError("tensor values exceed the float32 range of int8 scales")
    lo32 = lo.astype(np.float32)
    if x.dtype == torch.float64:  # round the minimum down, so that every code is >= 0
        lo32 = np.where(lo32 > lo, np.nextafter(lo32, np.float32(-np.inf)), lo32)
    span = hi - lo32
    scale = (span / _LEVELS).astype(np.float32)
    # Rounding may put lo + 255 * scale a hair above the largest value; one step down keeps it
    # within what the decoder accepts, and codes clamp at 255 anyway.
    over = lo32 + _LEVELS * scale.astype(np.float64) > limit
    if over.any():
        scale = np.where(over, np.nextafter(scale, np.float32(0)), scale)
    # float64 arithmetic where float32 would overflow (span beyond its range) or lose the
    # reciprocal (subnormal scales); weights never need it.
    wide = x.dtype == torch.float64 or bool(
        (span > _F32.max / 2).any() or ((scale > 0) & (scale < _F32.tiny)).any()
    )
    work = np.float64 if wide else np.float32
    scale_w = scale.astype(work)
    inv = np.divide(1, scale_w, out=np.zeros_like(scale_w), where=scale_w > 0)
    # float16 rows widen within the subtraction; then in place, one pass each. +0.5 and the
    # truncating uint8 cast round to nearest.
    codes = np.subtract(rows, lo32.astype(work)[:, None], dtype=work)
    codes *= inv[:, None]
    codes += 0.5
    np.clip(codes, 0, _LEVELS, out=codes)
    out = np.empty(8 * groups + numel, dtype=np.uint8)
    out[: 4 * groups].view(np.float32)[:] = lo32
    out[4 * groups : 8 * groups].view(np.float32)[:] = scale
    np.copyto(out[8 * groups :].reshape(groups, -1), codes, casting="unsafe")
    return out.tobytes()


def _encode_values(x: torch.Tensor, values: str, grouped: bool) -> bytes:
    """Value payload of a floating tensor (``grouped``: per-channel int8 if rank >= 2)."""
    if x.numel() == 0:
        return b""
    limit = _limit(x.dtype)
    if values == "int8":
        groups = _groups(tuple(x.shape)) if grouped else 1
        return _encode_int8(x, groups, limit)
    lo, hi = _finite_extremes(x)
    target = _CAST[values]
    ends = torch.tensor([lo, hi], dtype=torch.float64).to(target)
    if not bool(torch.isfinite(ends).all()):  # rounding is monotonic: the ends bound the rest
        raise CodecError(f"tensor values exceed the {target} range")
    return bytes(tensor_bytes(x.to(target)))


def _encode_topk(flat: torch.Tensor, spec: CodecSpec) -> bytes:
    numel = flat.numel()
    if numel == 0:
        return b""
    if numel >= _MAX_TOPK_NUMEL:
        raise CodecError(f"topk needs fewer than 2**32 elements, tensor has {numel}")
    _finite_extremes(flat)  # before topk: a NaN would otherwise just be ranked
    assert spec.topk is not None  # callers dispatch here on it
    k = topk_count(spec.topk, numel)
    if k == numel:
        index = np.arange(numel)
    else:
        # numpy's introselect is several times faster than torch.topk on CPU.
        magnitude = np.abs(_as_numpy(flat))
        index = np.sort(np.argpartition(magnitude, numel - k)[numel - k :])
    # bfloat16 goes through float32 and back, exactly.
    kept = torch.from_numpy(_as_numpy(flat)[index]).to(flat.dtype)
    head = index.astype("<u4").tobytes()
    return head + _encode_values(kept, spec.values, grouped=False)


_local = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    # Contexts are not thread-safe but are worth reusing: one per thread.
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return cctx


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode_tensor(t: torch.Tensor, spec: CodecSpec) -> bytes:
    """Payload of ``t`` under ``spec``; decode with the same spec, shape and dtype.

    Floating tensors must be finite. For top-k, ``t`` is an update (a difference to a
    reference the receiver holds), since dropped entries decode to zero.
    """
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"expected a tensor, got {type(t).__name__}")
    _check_dtype(t.dtype)
    t = t.detach().cpu().contiguous()
    if not t.dtype.is_floating_point:
        payload = bytes(tensor_bytes(t))
    elif spec.topk is None:
        payload = _encode_values(t, spec.values, grouped=True)
    else:
        payload = _encode_topk(t.reshape(-1), spec)
    if spec.lossless == "zstd":
        return _zstd_compressor().compress(payload)
    if spec.lossless == "zlib":
        return zlib.compress(payload, ZLIB_LEVEL)
    return payload


# ---------------------------------------------------------------------------------------------
# Decoding.


def _as_bytes(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        view = memoryview(data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError:
        raise CodecError(f"payload must be bytes, got {type(data).__name__}") from None


def _decompress(buf: memoryview, method: str, expected: int) -> bytes:
    """Exactly ``expected`` bytes out of one frame/stream, never allocating more."""
    if len(buf) > _compress_bound(method, expected):
        raise CodecError(f"{method} payload of {len(buf)} bytes is too long for {expected}")
    if method == "zstd":
        try:
            frame = zstandard.get_frame_parameters(buf)
        except zstandard.ZstdError:
            raise CodecError("payload is not a zstd frame") from None
        # Our encoder always records the size; checking it first bounds the allocation.
        if frame.content_size != expected or frame.dict_id != 0:
            raise CodecError(f"zstd frame does not announce {expected} bytes")
        try:
            if expected:
                return _zstd_decompressor().decompress(
                    buf, max_output_size=expected, allow_extra_data=False
                )
            # decompress() returns b"" for an empty frame without looking further; the
            # streaming path checks the rest (its output is bounded by the tiny input).
            stream = _zstd_decompressor().decompressobj()
            out = stream.decompress(buf)
        except (zstandard.ZstdError, MemoryError):
            raise CodecError("corrupt zstd payload") from None
        if out or not stream.eof or stream.unused_data:
            raise CodecError("zstd payload of an empty tensor is not one empty frame")
        return out
    inflate = zlib.decompressobj()
    try:
        # max_length bounds the output; one byte more than needed reveals an overlong stream.
        out = inflate.decompress(buf, expected + 1)
    except (zlib.error, MemoryError):
        raise CodecError("corrupt zlib payload") from None
    if len(out) != expected or not inflate.eof or inflate.unused_data or inflate.unconsumed_tail:
        raise CodecError(f"zlib payload does not hold exactly {expected} bytes")
    return out


def _check_finite(t: torch.Tensor) -> None:
    if t.numel() and not all(math.isfinite(v) for v in _extremes(t)):
        raise CodecError("payload decodes to NaN or infinite values")


def _decode_int8(arr: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    groups = _groups(shape)
    params = np.frombuffer(arr, dtype="<f4", count=2 * groups)
    lo, scale = params[:groups], params[groups:]
    if not _int8_params_ok(lo, scale, _limit(dtype)):
        raise CodecError("int8 payload holds invalid minima or scales")
    # float32 unless a code times its scale could overflow it (only spans beyond its range).
    wide = bool((scale.astype(np.float64) * _LEVELS > _F32.max / 2).any())
    work = np.float64 if wide else np.float32
    out = np.empty((groups, math.prod(shape) // groups), dtype=work)
    np.copyto(out, arr[8 * groups :].reshape(groups, -1), casting="unsafe")
    out *= scale.astype(work)[:, None]
    out += lo.astype(work)[:, None]
    return torch.from_numpy(out).to(dtype).reshape(shape)


def _decode_values(
    arr: np.ndarray, values: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=dtype)
    if values == "int8":
        return _decode_int8(arr, shape, dtype)
    src = torch.empty(shape, dtype=_CAST[values])
    src.reshape(-1).view(torch.uint8).numpy()[:] = arr
    out = src.to(dtype)
    _check_finite(out)  # the encoder never sends NaN/inf, and a cast may overflow
    return out


def _decode_topk(
    arr: np.ndarray, spec: CodecSpec, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    numel = math.prod(shape)
    assert spec.topk is not None  # callers dispatch here on it
    k = topk_count(spec.topk, numel)
    if k == 0:
        return torch.zeros(shape, dtype=dtype)
    index = np.frombuffer(arr, dtype="<u4", count=k).astype(np.int64)
    if int(index[-1]) >= numel or not bool(np.all(index[1:] > index[:-1])):
        raise CodecError("topk indices are not strictly increasing below the element count")
    kept = _as_numpy(_decode_values(arr[4 * k :], spec.values, (k,), dtype))
    out = np.zeros(numel, dtype=kept.dtype)  # float32 for bfloat16, cast back exactly below
    out[index] = kept
    return torch.from_numpy(out).to(dtype).reshape(shape)


def decode_tensor(
    data: bytes | bytearray | memoryview,
    spec: CodecSpec,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Tensor of ``shape`` and ``dtype`` from a payload; ``CodecError`` if it is not valid."""
    dims = _check_shape(shape)
    expected = payload_bytes(spec, dims, dtype)
    payload = _as_bytes(data)
    buf = payload if spec.lossless is None else _decompress(payload, spec.lossless, expected)
    if len(buf) != expected:
        raise CodecError(
            f"payload holds {len(buf)} bytes, {spec.name} of shape {list(dims)} {dtype} "
            f"needs {expected}"
        )
    arr = np.frombuffer(buf, dtype=np.uint8)
    if not dtype.is_floating_point:
        if dtype == torch.bool and arr.size and int(arr.max()) > 1:
            raise CodecError("bool payload holds bytes other than 0 and 1")
        out = torch.empty(dims, dtype=dtype)
        if arr.size:
            out.reshape(-1).view(torch.uint8).numpy()[:] = arr
        return out
    if spec.topk is None:
        return _decode_values(arr, spec.values, dims, dtype)
    return _decode_topk(arr, spec, dims, dtype)


# ---------------------------------------------------------------------------------------------
# State dicts and error feedback.

Layout = Mapping[str, tuple[Sequence[int], torch.dtype]]


def layout_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes the receiver needs to decode ``encode_state(state, ...)``."""
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def encode_state(state: Mapping[str, torch.Tensor], spec: CodecSpec) -> dict[str, bytes]:
    """Every tensor of ``state`` encoded with ``spec``."""
    return {name: encode_tensor(t, spec) for name, t in state.items()}


def decode_state(
    payloads: Mapping[str, bytes], spec: CodecSpec, layout: Layout
) -> dict[str, torch.Tensor]:
    """Tensors from ``encode_state``'s payloads, each checked against its ``layout``."""
    if set(payloads) != set(layout):
        raise CodecError("payload names do not match the expected tensors")
    return {name: decode_tensor(payloads[name], spec, *layout[name]) for name in layout}


class ErrorFeedback:
    """Silo-side memory of what lossy codecs dropped, added back to the next update.

    After every ``compress``, the updates sent (as decoded) plus the residual add up to the
    updates given, so nothing is lost for good, only delayed.
    """

    def __init__(self) -> None:
        self._residual: dict[str, torch.Tensor] = {}
        self._before: tuple[int, dict[str, torch.Tensor]] | None = None

    def start_round(self, round_num: int) -> None:
        """Call before compressing a round's update. A round trained again (the coordinator
        restarted before committing it) starts from the residuals its first try started
        from, so it sends what an uninterrupted run sends."""
        if self._before is not None and self._before[0] == round_num:
            self._residual = dict(self._before[1])
        else:
            # Tensors in the dict are replaced, never changed in place: a shallow copy holds.
            self._before = (round_num, dict(self._residual))

    def residual(self, name: str) -> torch.Tensor | None:
        """What a lossy codec dropped from tensor ``name`` last time, or None."""
        return self._residual.get(name)

    def compress(self, update: Mapping[str, torch.Tensor], spec: CodecSpec) -> dict[str, bytes]:
        """Encode ``update`` plus the carried residuals; keep what the codec drops now."""
        payloads: dict[str, bytes] = {}
        residual: dict[str, torch.Tensor] = {}
        for name, u in update.items():
            u = u.detach().cpu()
            if not u.is_floating_point():
                payloads[name] = encode_tensor(u, spec)
                continue
            # Residuals accumulate in at least float32, whatever precision travels.
            wide = torch.float64 if u.dtype == torch.float64 else torch.float32
            total = u.to(wide)
            old = self._residual.get(name)
            if old is not None and old.shape == total.shape:
                total = total + old
            payloads[name] = encode_tensor(total.to(u.dtype), spec)
            sent = decode_tensor(payloads[name], spec, tuple(u.shape), u.dtype)
            residual[name] = total - sent.to(wide)
        # Only now: an update that fails to encode leaves the previous residuals intact.
        self._residual.update(residual)
        return payloads
