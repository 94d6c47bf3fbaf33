"""Property tests of the tensor codecs: round trips, error bounds, top-k, hostile payloads."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lssfl.common.codecs import (
    CodecError,
    CodecSpec,
    ErrorFeedback,
    decode_state,
    decode_tensor,
    encode_state,
    encode_tensor,
    layout_of,
    max_encoded_bytes,
    parse_codec,
    payload_bytes,
    topk_count,
)

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EXACT = (torch.int64, torch.int32, torch.uint8, torch.bool)
VALUES = ("fp32", "fp16", "bf16", "int8")
LOSSLESS = (None, "zstd", "zlib")
TOPKS = (None, 0.01, 0.3, 1.0)
# Unit roundoff: the largest relative error of rounding to nearest in each format.
UNIT = {
    torch.float64: 0.0,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    "fp32": 2.0**-24,
    "fp16": 2.0**-11,
    "bf16": 2.0**-8,
}

# Small examples, no example database written into the checkout, and no deadline: a shared
# two-core machine can take any time over one example.
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

specs = st.builds(
    CodecSpec,
    values=st.sampled_from(VALUES),
    topk=st.sampled_from(TOPKS),
    lossless=st.sampled_from(LOSSLESS),
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(draw, dtypes=FLOATS + EXACT, shape=None):
    """Tensors of any supported dtype and rank 0-4, values spread over many magnitudes."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(shapes) if shape is None else shape
    if dtype == torch.bool:
        return torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
    if not dtype.is_floating_point:
        info = np.iinfo(np.dtype(str(dtype).removeprefix("torch.")))
        arr = draw(hnp.arrays(info.dtype, shape, elements=st.integers(info.min, info.max)))
        return torch.from_numpy(arr)
    # float16 must stay within its range; the others may use most of float32's.
    exponent = draw(st.integers(-8, 0) if dtype == torch.float16 else st.integers(-40, 30))
    elements = st.floats(-1e4, 1e4, allow_subnormal=True, width=32)
    arr = np.asarray(draw(hnp.arrays(np.float64, shape, elements=elements)) * 10.0**exponent)
    if draw(st.booleans()) and len(shape) >= 2 and arr.size:
        arr[0] = arr.reshape(shape[0], -1)[0, 0]  # a constant channel
    return torch.from_numpy(arr).to(dtype)


def _plain(spec: CodecSpec) -> CodecSpec:
    return CodecSpec(values=spec.values, topk=spec.topk)


def _raw_payload(data: bytes, spec: CodecSpec) -> bytes:
    if spec.lossless == "zstd":
        return zstandard.ZstdDecompressor().decompress(data)
    if spec.lossless == "zlib":
        return zlib.decompress(data)
    return data


def _roundtrip(t: torch.Tensor, spec: CodecSpec) -> torch.Tensor | None:
    """Decoded tensor, or None where the encoder refused values outside the codec's range."""
    try:
        data = encode_tensor(t, spec)
    except CodecError as exc:
        assert "range" in str(exc)
        _assert_out_of_range(t, spec)
        return None
    assert len(data) <= max_encoded_bytes(spec, t.shape, t.dtype)
    out = decode_tensor(data, spec, tuple(t.shape), t.dtype)
    assert out.shape == t.shape and out.dtype == t.dtype
    return out


def _assert_out_of_range(t: torch.Tensor, spec: CodecSpec) -> None:
    top = float(t.double().abs().max())
    limit = 65504 if spec.values == "fp16" else float(torch.finfo(torch.bfloat16).max)
    assert top > limit or t.dtype == torch.float64 and top > torch.finfo(torch.float32).max


def _int8_bound(x: torch.Tensor, groups: int, target: torch.dtype) -> torch.Tensor:
    """Per-element error allowed for int8: half a step, float32 arithmetic, final rounding."""
    rows = x.double().reshape(groups, -1)
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    top = torch.maximum(lo.abs(), hi.abs())
    bound = 0.5 * (hi - lo) / 255 * (1 + 1e-4) + 1e-6 * top + 1e-37
    # Rounding the decoded value to the tensor's own dtype: relative to that value (at most
    # |x| + bound), or absolute among float16 subnormals.
    tiny = 2.0**-24 if target == torch.float16 else 0.0
    return (bound + 2 * UNIT[target] * (rows.abs() + bound) + tiny).reshape(x.shape)


# --- codec strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "fp32",
        "fp16",
        "bf16",
        "int8",
        "int8+zstd",
        "topk0.01+int8",
        "topk0.01+int8+zstd",
        "fp32+zlib",
        "topk1.0+bf16",
        "topk1e-05+fp16+zlib",
    ],
)
def test_canonical_names_round_trip(text):
    spec = parse_codec(text)
    assert spec.name == text
    assert parse_codec(spec.name) == spec


def test_raw_is_fp32():
    assert parse_codec("raw") == CodecSpec("fp32")
    assert parse_codec("raw+zstd").name == "fp32+zstd"
    assert parse_codec("topk0.010+int8").name == "topk0.01+int8"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "int4",
        "INT8",
        "fp32 ",
        "zstd",
        "int8+zstd+zlib",
        "zstd+int8",
        "topk0.1",
        "topk0+int8",
        "topk1.5+int8",
        "topk-0.1+int8",
        "topknan+int8",
        "topkinf+int8",
        "topk1e999+int8",
        "int8+topk0.1",
        "fp32+raw",
    ],
)
def test_bad_codec_strings(text):
    with pytest.raises(CodecError, match="codec"):
        parse_codec(text)


@SETTINGS
@given(specs)
def test_spec_name_parses_back(spec):
    assert parse_codec(spec.name) == spec


def test_topk_count():
    assert topk_count(0.07, 100) == 7  # no float noise in the ceiling
    assert topk_count(0.01, 1) == 1
    assert topk_count(0.01, 0) == 0
    assert topk_count(1.0, 9) == 9
    assert topk_count(0.01, 262144) == 2622


# --- round trips and error bounds ------------------------------------------------------------


@SETTINGS
@given(tensors(dtypes=EXACT), specs)
def test_integer_tensors_travel_exactly(t, spec):
    out = _roundtrip(t, spec)
    assert torch.equal(out, t)


@SETTINGS
@given(tensors(dtypes=FLOATS), st.sampled_from(LOSSLESS))
def test_fp32_round_trip(t, lossless):
    out = _roundtrip(t, CodecSpec("fp32", lossless=lossless))
    if out is None:
        return
    # Exact for every format float32 holds; float64 is rounded to float32 once.
    assert torch.equal(out, t.float().to(t.dtype))


@SETTINGS
@given(tensors(dtypes=FLOATS), st.sampled_from(["fp16", "bf16"]), st.sampled_from(LOSSLESS))
def test_half_precision_error(t, values, lossless):
    out = _roundtrip(t, CodecSpec(values, lossless=lossless))
    if out is None:
        return
    x, y = t.double(), out.double()
    unit = UNIT[values] + UNIT[t.dtype] * (1 + UNIT[values])
    tiny = 2.0**-24 if values == "fp16" else 1e-37  # half the smallest subnormal, roughly
    assert bool(((y - x).abs() <= unit * x.abs() * (1 + 1e-9) + tiny).all())


@SETTINGS
@given(tensors(dtypes=FLOATS), st.sampled_from(LOSSLESS))
def test_int8_error(t, lossless):
    out = _roundtrip(t, CodecSpec("int8", lossless=lossless))
    if out is None or t.numel() == 0:
        return
    groups = t.shape[0] if t.dim() >= 2 else 1
    err = (out.double() - t.double()).abs()
    assert bool((err <= _int8_bound(t, groups, t.dtype)).all())
    if t.dtype == torch.float64:
        return  # rounded to float32 on the way, so not even constants are exact
    rows, got = t.reshape(groups, -1), out.reshape(groups, -1)
    for c in range(groups):
        if bool((rows[c] == rows[c, 0]).all()):
            assert torch.equal(got[c], rows[c])  # constant channels are exact


def test_int8_extremes():
    f32 = torch.finfo(torch.float32)
    cases = [
        torch.tensor([-f32.max, f32.max]),
        torch.tensor([[f32.max, f32.max / 3], [0.0, f32.tiny / 4]]),
        torch.tensor([1e30, 1e30 * (1 + 2**-23)]),
        torch.tensor([1.0, 1.0 + 2**-23, 1.0 + 2**-22]),
        torch.tensor([0.0, 1e-45, 3e-45]),
        torch.tensor([65504.0, -65504.0, 1.0]).half(),
        torch.tensor([torch.finfo(torch.bfloat16).max, 0.0]).bfloat16(),
        torch.tensor([1e-300, 2e-300], dtype=torch.float64),
    ]
    for t in cases:
        out = _roundtrip(t, CodecSpec("int8"))
        assert bool(torch.isfinite(out).all())
        err = (out.double() - t.double()).abs()
        assert bool((err <= _int8_bound(t, t.shape[0] if t.dim() >= 2 else 1, t.dtype)).all())


def test_out_of_range_values_are_refused():
    with pytest.raises(CodecError, match="range"):
        encode_tensor(torch.tensor([1e5]), CodecSpec("fp16"))
    with pytest.raises(CodecError, match="range"):
        encode_tensor(torch.tensor([1e300], dtype=torch.float64), CodecSpec("fp32"))
    with pytest.raises(CodecError, match="range"):
        encode_tensor(torch.tensor([1e300, 0.0], dtype=torch.float64), CodecSpec("int8"))


@SETTINGS
@given(tensors(dtypes=FLOATS, shape=None), st.sampled_from(VALUES), st.sampled_from(TOPKS[1:]))
def test_topk_keeps_the_largest(t, values, topk):
    spec = CodecSpec(values, topk=topk)
    out = _roundtrip(t, spec)
    if out is None:
        return
    numel, k = t.numel(), topk_count(topk, t.numel())
    payload = encode_tensor(t, spec)
    index = np.frombuffer(payload, dtype="<u4", count=k).astype(np.int64)
    assert len(payload) == payload_bytes(spec, t.shape, t.dtype)
    assert np.all(np.diff(index) > 0) and (k == 0 or index[-1] < numel)
    flat, got = t.reshape(-1).double(), out.reshape(-1).double()
    dropped = np.ones(numel, dtype=bool)
    dropped[index] = False
    mask = torch.from_numpy(dropped)
    assert bool((got[mask] == 0).all())
    if 0 < k < numel:
        assert float(flat[~mask].abs().min()) >= float(flat[mask].abs().max())  # ties allowed
    kept, sent = flat[~mask], got[~mask]
    if k == 0:
        return
    if values == "int8":
        bound = _int8_bound(t.reshape(-1)[~mask], 1, t.dtype)
    else:
        bound = (UNIT[values] + 2 * UNIT[t.dtype]) * kept.abs() * (1 + 1e-9) + 2.0**-24
    assert bool(((sent - kept).abs() <= bound).all())


@SETTINGS
@given(tensors(), specs)
def test_lossless_stage_is_exact(t, spec):
    if spec.lossless is None:
        return
    try:
        data = encode_tensor(t, spec)
    except CodecError:
        return
    plain = encode_tensor(t, _plain(spec))
    assert _raw_payload(data, spec) == plain
    shape = tuple(t.shape)
    out = decode_tensor(data, spec, shape, t.dtype)
    assert torch.equal(out, decode_tensor(plain, _plain(spec), shape, t.dtype))


@SETTINGS
@given(
    tensors(dtypes=FLOATS, shape=(3, 4)),
    specs,
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(0, 11),
)
def test_non_finite_input_is_refused(t, spec, bad, where):
    t = t.clone()
    t.view(-1)[where] = bad
    with pytest.raises(CodecError, match="tensor holds NaN or infinite values"):
        encode_tensor(t, spec)


# --- hostile payloads ------------------------------------------------------------------------


def _check_decoded_or_refused(data, spec, shape, dtype) -> None:
    try:
        out = decode_tensor(data, spec, shape, dtype)
    except CodecError:
        return
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    if dtype.is_floating_point:
        assert bool(torch.isfinite(out).all())


@SETTINGS
@given(specs, shapes, st.sampled_from(FLOATS + EXACT), st.data())
def test_random_bytes_decode_or_refuse(spec, shape, dtype, data):
    # Half the time exactly the length the decoder expects, so that parsing goes deeper.
    size = payload_bytes(spec, shape, dtype)
    length = data.draw(st.sampled_from([size, data.draw(st.integers(0, 2 * size + 16))]))
    blob = data.draw(st.binary(min_size=length, max_size=length))
    _check_decoded_or_refused(blob, spec, shape, dtype)


@SETTINGS
@given(tensors(), specs)
def test_truncated_payloads_are_refused(t, spec):
    try:
        data = encode_tensor(t, spec)
    except CodecError:
        return
    shape = tuple(t.shape)
    for end in range(len(data)):
        with pytest.raises(CodecError):
            decode_tensor(data[:end], spec, shape, t.dtype)
    with pytest.raises(CodecError):
        decode_tensor(data + b"\0", spec, shape, t.dtype)


@SETTINGS
@given(tensors(dtypes=FLOATS), specs, st.data())
def test_bit_flips_decode_or_refuse(t, spec, data):
    try:
        plain = bytearray(encode_tensor(t, _plain(spec)))
    except CodecError:
        return
    if not plain:
        return
    # The prefix (minima and scales, or indices and the value prefix) is where trust matters.
    head = min(len(plain), 64)
    for _ in range(data.draw(st.integers(1, 4))):
        bit = data.draw(st.integers(0, 8 * head - 1))
        plain[bit // 8] ^= 1 << (bit % 8)
    blob = encode_lossless(bytes(plain), spec)
    _check_decoded_or_refused(blob, spec, tuple(t.shape), t.dtype)


def encode_lossless(payload: bytes, spec: CodecSpec) -> bytes:
    if spec.lossless == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(payload)
    if spec.lossless == "zlib":
        return zlib.compress(payload)
    return payload


def test_specific_hostile_payloads():
    spec = CodecSpec("int8")
    lo_scale = np.array([0.0, np.nan], dtype="<f4").tobytes()
    with pytest.raises(CodecError, match="scales"):
        decode_tensor(lo_scale + bytes(4), spec, (4,), torch.float32)
    huge = np.array([0.0, 3e38], dtype="<f4").tobytes()
    with pytest.raises(CodecError, match="scales"):
        decode_tensor(huge + bytes(4), spec, (4,), torch.float32)
    negative = np.array([0.0, -1.0], dtype="<f4").tobytes()
    with pytest.raises(CodecError, match="scales"):
        decode_tensor(negative + bytes(4), spec, (4,), torch.float32)
    in_f32_not_f16 = np.array([0.0, 1000.0], dtype="<f4").tobytes()
    with pytest.raises(CodecError, match="scales"):
        decode_tensor(in_f32_not_f16 + bytes([255] * 4), spec, (4,), torch.float16)
    topk = CodecSpec("fp32", topk=0.5)
    for index in ([1, 1], [2, 1], [0, 4]):
        blob = np.array(index, dtype="<u4").tobytes() + bytes(8)
        with pytest.raises(CodecError, match="indices"):
            decode_tensor(blob, topk, (4,), torch.float32)
    with pytest.raises(CodecError, match="NaN"):
        decode_tensor(np.array([np.inf], dtype="<f4").tobytes(), CodecSpec(), (1,), torch.float32)
    with pytest.raises(CodecError, match="NaN"):  # fits float32, overflows float16
        decode_tensor(np.array([1e6], dtype="<f4").tobytes(), CodecSpec(), (), torch.float16)
    with pytest.raises(CodecError, match="bool"):
        decode_tensor(bytes([0, 1, 2]), CodecSpec(), (3,), torch.bool)
    for shape in [(-1,), (2.0,), "ab", None]:
        with pytest.raises(CodecError, match="shape"):
            decode_tensor(b"", CodecSpec(), shape, torch.float32)
    with pytest.raises(CodecError, match="dtype"):
        decode_tensor(b"", CodecSpec(), (0,), torch.complex64)


def test_decompression_is_bounded():
    zstd = CodecSpec("fp32", lossless="zstd")
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(1 << 20))
    with pytest.raises(CodecError):  # announces more than the shape needs
        decode_tensor(bomb, zstd, (4,), torch.float32)
    unknown = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(16))
    with pytest.raises(CodecError):  # no announced size: refused rather than guessed
        decode_tensor(unknown, zstd, (4,), torch.float32)
    with pytest.raises(CodecError):
        decode_tensor(encode_lossless(b"", zstd) + b"x", zstd, (0,), torch.float32)
    zlib_spec = CodecSpec("fp32", lossless="zlib")
    with pytest.raises(CodecError):
        decode_tensor(zlib.compress(bytes(1 << 20)), zlib_spec, (4,), torch.float32)
    with pytest.raises(CodecError):
        decode_tensor(zlib.compress(bytes(16)) + b"x", zlib_spec, (4,), torch.float32)


# --- state dicts, error feedback, ratios -----------------------------------------------------


def test_state_helpers_round_trip():
    state = {"w": torch.randn(4, 3), "b": torch.randn(4), "n": torch.tensor(7)}
    spec = parse_codec("int8+zstd")
    out = decode_state(encode_state(state, spec), spec, layout_of(state))
    assert set(out) == set(state) and torch.equal(out["n"], state["n"])
    with pytest.raises(CodecError):
        decode_state({"w": b""}, spec, layout_of(state))


@pytest.mark.parametrize("codec", ["topk0.1+int8", "topk0.05+fp16+zstd", "int8", "bf16"])
def test_error_feedback_conserves_the_update(codec):
    spec = parse_codec(codec)
    g = torch.Generator().manual_seed(0)
    layout = {"w": ((16, 8), torch.float32), "h": ((10,), torch.float16), "n": ((), torch.int64)}
    feedback = ErrorFeedback()
    true_sum = {n: torch.zeros(shape, dtype=torch.float64) for n, (shape, _) in layout.items()}
    sent_sum = {name: torch.zeros_like(total) for name, total in true_sum.items()}
    for _ in range(6):
        update = {
            "w": torch.randn(16, 8, generator=g),
            "h": torch.randn(10, generator=g).half(),
            "n": torch.randint(0, 100, (), generator=g),
        }
        payloads = feedback.compress(update, spec)
        decoded = decode_state(payloads, spec, layout)
        assert torch.equal(decoded["n"], update["n"])
        for name in layout:
            true_sum[name] += update[name].double()
            sent_sum[name] += decoded[name].double()
    assert feedback.residual("n") is None
    for name in ("w", "h"):
        total = sent_sum[name] + feedback.residual(name).double()
        assert torch.allclose(total, true_sum[name], rtol=0, atol=1e-4)


def test_error_feedback_keeps_state_when_encoding_fails():
    feedback = ErrorFeedback()
    spec = parse_codec("topk0.5+int8")
    feedback.compress({"w": torch.ones(4)}, spec)
    before = feedback.residual("w").clone()
    with pytest.raises(CodecError):
        feedback.compress({"w": torch.ones(4), "x": torch.tensor([math.nan])}, spec)
    assert torch.equal(feedback.residual("w"), before)


def test_compression_ratios():
    t = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    fp32 = t.numel() * 4
    assert len(encode_tensor(t, parse_codec("int8"))) <= 0.26 * fp32
    assert len(encode_tensor(t, parse_codec("topk0.01+int8+zstd"))) <= 0.05 * fp32
    assert len(encode_tensor(t, parse_codec("fp16"))) == fp32 // 2
