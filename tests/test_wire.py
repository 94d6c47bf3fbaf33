import json

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from lssfl.common.codecs import parse_codec
from lssfl.common.wire import (
    CHUNK_BYTES,
    DTYPES,
    RawData,
    WireError,
    data_message,
    decode_after_header,
    decode_model,
    encode_model,
    held_state,
    pack_state,
    parse_chunk,
    raw_fp32_bytes,
    read_header,
    stream_tensors,
    to_wire,
)
from lssfl.proto import tensor_pb2 as pb

HEADER = pb.ModelChunk(download=pb.DownloadHeader(run_id="r", round=1))


def roundtrip(state, **kw):
    return decode_model(
        list(encode_model(state, HEADER)), header_kind="download", max_payload_bytes=1 << 30, **kw
    )


def sample_state():
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, dtype in DTYPES.items():
        t = torch.randn(3, 5, generator=g) * 100
        state[f"t_{name}"] = t > 0 if dtype == torch.bool else t.to(dtype)
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0, 4)
    state["empty_from_numpy"] = torch.from_numpy(np.zeros((0,), np.int64))
    state["counter"] = torch.tensor(7, dtype=torch.int64)
    return state


def test_roundtrip_is_bit_exact_for_every_dtype_scalar_and_empty():
    state = sample_state()
    out = roundtrip(state).state
    assert list(out) == list(state)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        if t.numel():  # compare bytes: NaN-safe and exact for every dtype
            assert torch.equal(
                out[name].view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
            )


def test_large_tensor_is_split_into_chunks_of_at_most_one_mib():
    big = torch.arange(700_000, dtype=torch.float32)  # 2.8 MB
    msgs = list(encode_model({"w": big}, HEADER))
    data = [m.data for m in map(parse_chunk, map(to_wire, msgs)) if isinstance(m, RawData)]
    assert len(data) == 3 and max(len(d) for d in data) == CHUNK_BYTES
    assert all(len(to_wire(m)) < 2 * CHUNK_BYTES for m in msgs)
    end = msgs[-1].end
    assert end.payload_bytes == big.numel() * 4
    spec = json.dumps(["w", "float32", [700_000], "raw", big.numel() * 4, False]).encode()
    assert end.checksum == xxhash.xxh3_128(spec + big.numpy().tobytes()).digest()
    assert torch.equal(roundtrip({"w": big}).state["w"], big)


def test_raw_fp32_bytes_counts_floats_as_fp32_and_integers_at_their_width():
    assert raw_fp32_bytes(pb.TensorSpec(dtype="float16", shape=[10, 3])) == 120
    assert raw_fp32_bytes(pb.TensorSpec(dtype="int64", shape=[])) == 8


def _msgs():
    return list(encode_model({"a": torch.ones(4), "b": torch.zeros(2, 2)}, HEADER))


def _decode(msgs, limit=1 << 30):
    return decode_model(msgs, header_kind="download", max_payload_bytes=limit)


def test_truncated_stream_is_rejected():
    msgs = _msgs()
    for cut in range(1, len(msgs)):
        with pytest.raises(WireError):
            _decode(msgs[:cut])


def test_corrupted_payload_fails_the_checksum():
    msgs = _msgs()
    i = next(i for i, m in enumerate(msgs) if isinstance(m, bytes))
    bad = bytearray(parse_chunk(msgs[i]).data)
    bad[0] ^= 1
    msgs[i] = pb.ModelChunk(data=bytes(bad))
    with pytest.raises(WireError, match="checksum"):
        _decode(msgs)


def test_a_stream_end_without_checksum_names_the_likely_cause():
    msgs = _msgs()
    msgs[-1].end.ClearField("checksum")
    with pytest.raises(WireError, match="no checksum: is the peer an older build"):
        _decode(msgs)


def test_swapped_chunks_of_equal_length_fail_the_checksum():
    # Every length still adds up; only the order of the bytes is wrong.
    msgs = list(encode_model({"a": torch.ones(4), "b": torch.zeros(4)}, HEADER))
    i, j = (i for i, m in enumerate(msgs) if isinstance(m, bytes))
    msgs[i], msgs[j] = msgs[j], msgs[i]
    with pytest.raises(WireError, match="checksum mismatch"):
        _decode(msgs)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: setattr(s, "dtype", "complex128"), "unknown dtype"),
        (lambda s: setattr(s, "codec", "zip"), "unknown codec"),
        (lambda s: setattr(s, "nbytes", 12), "announced"),
        (lambda s: s.shape.append(-1), "invalid shape"),
        (lambda s: setattr(s, "name", ""), "empty name"),
    ],
)
def test_bad_tensor_spec_is_rejected_with_a_reason(mutate, message):
    msgs = _msgs()
    mutate(msgs[1].tensor)
    with pytest.raises(WireError, match=message):
        _decode(msgs)


def test_structural_errors():
    msgs = _msgs()
    with pytest.raises(WireError, match="must start"):
        _decode(msgs[1:])
    with pytest.raises(WireError, match="must start"):
        decode_model(msgs, header_kind="upload", max_payload_bytes=1 << 30)
    with pytest.raises(WireError, match="data before"):
        _decode([msgs[0], pb.ModelChunk(data=b"x"), *msgs[1:]])
    with pytest.raises(WireError, match="sent twice"):
        _decode([msgs[0], msgs[1], msgs[2], msgs[1], msgs[2], *msgs[3:]])
    with pytest.raises(WireError, match="after the end"):
        _decode([*msgs, msgs[-1]])
    with pytest.raises(WireError, match="more than"):
        _decode([msgs[0], msgs[1], msgs[2], msgs[2], *msgs[3:]])
    with pytest.raises(WireError, match="empty"):
        _decode([msgs[0], pb.ModelChunk(), *msgs[1:]])
    with pytest.raises(WireError, match="size limit"):
        _decode(msgs, limit=10)


def test_random_garbage_never_crashes():
    g = torch.Generator().manual_seed(1)
    msgs = _msgs()
    for _ in range(200):
        raw = bytes(
            torch.randint(
                0,
                256,
                (int(torch.randint(1, 64, (1,), generator=g)),),
                generator=g,
                dtype=torch.uint8,
            ).tolist()
        )
        try:
            junk = pb.ModelChunk.FromString(raw)
        except Exception:  # protobuf's DecodeError: what gRPC itself would refuse
            continue
        pos = int(torch.randint(1, len(msgs), (1,), generator=g))
        with pytest.raises(WireError):
            _decode([*msgs[:pos], junk, *msgs[pos:]])


def test_fast_data_messages_are_exactly_what_protobuf_writes():
    for size in (0, 1, 127, 128, 300, 16384, CHUNK_BYTES):
        piece = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert data_message(piece) == pb.ModelChunk(data=piece).SerializeToString()
        parsed = parse_chunk(data_message(piece))
        assert isinstance(parsed, RawData) and bytes(parsed.data) == piece
    # Anything else goes through protobuf, and garbage is a WireError.
    spec = pb.ModelChunk(tensor=pb.TensorSpec(name="a")).SerializeToString()
    assert parse_chunk(spec).tensor.name == "a"
    truncated = data_message(b"abc")[:-1]
    with pytest.raises(WireError):
        parse_chunk(truncated)


def test_delta_tensors_add_to_the_reference_and_need_one():
    ref = {"w": torch.arange(300_000, dtype=torch.float32)}  # > 1 chunk: copied in pieces
    msgs = list(stream_tensors(pack_state({"w": ref["w"] + 1}, reference=ref), HEADER))
    assert msgs[1].tensor.delta
    out = decode_model(msgs, header_kind="download", max_payload_bytes=1 << 30, reference=ref)
    assert torch.equal(out.state["w"], ref["w"] + 1)
    with pytest.raises(WireError, match="without a matching reference"):
        _decode(msgs)


def _stream_bytes(spec: str = "fp32") -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    state = {"w": w, "b": b, "n": torch.tensor(7)}
    return [to_wire(m) for m in encode_model(state, HEADER, parse_codec(spec))]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["fp32", "int8", "topk0.5+int8+zstd"]), st.data())
def test_damaged_streams_decode_or_refuse(spec, data):
    # Any byte of any message flipped, cut short, dropped or repeated: the decoder either
    # returns a model or raises WireError, never anything else.
    msgs = _stream_bytes(spec)
    i = data.draw(st.integers(0, len(msgs) - 1))
    damage = data.draw(st.sampled_from(["flip", "cut", "drop", "repeat"]))
    if damage == "flip" and msgs[i]:
        at = data.draw(st.integers(0, len(msgs[i]) - 1))
        bad = bytearray(msgs[i])
        bad[at] ^= data.draw(st.integers(1, 255))
        msgs[i] = bytes(bad)
    elif damage == "cut":
        msgs[i] = msgs[i][: data.draw(st.integers(0, max(len(msgs[i]) - 1, 0)))]
    elif damage == "drop":
        del msgs[i]
    else:
        msgs.insert(i, msgs[i])
    try:
        out = _decode(msgs)
    except WireError:
        return
    # Accepted only if nothing the checksum covers changed (a header field may have).
    clean = _decode(_stream_bytes(spec)).state
    assert out.state.keys() == clean.keys()
    for name, t in clean.items():
        assert out.state[name].dtype == t.dtype and torch.equal(out.state[name], t)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=48), max_size=6))
def test_random_messages_after_a_header_are_refused(raw):
    with pytest.raises(WireError):
        _decode([to_wire(HEADER), *raw])


@pytest.mark.parametrize("codec", ["fp32", "int8", "fp16+zstd", "topk0.1+int8"])
@pytest.mark.parametrize("delta", [False, True])
def test_held_state_is_what_the_receiver_decodes(codec, delta):
    gen = torch.Generator().manual_seed(3)
    ref = {"w": torch.randn(64, 9, generator=gen), "n": torch.tensor(7), "e": torch.zeros(0)}
    state = {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if k == "w" else v)
             for k, v in ref.items()}  # fmt: skip
    reference = ref if delta else None
    if codec.startswith("topk") and not delta:
        codec = "int8"  # top-k needs a delta
    tensors = pack_state(state, parse_codec(codec), reference)
    held = held_state(tensors, reference)
    stream = iter(list(stream_tensors(tensors, HEADER)))
    header = read_header(stream, "download")
    decoded = decode_after_header(header, stream, max_payload_bytes=1 << 30, reference=reference)
    assert held.keys() == decoded.state.keys()
    for name, t in decoded.state.items():
        assert held[name].dtype == t.dtype and torch.equal(held[name], t), name
    if codec != "fp32":
        assert not torch.equal(held["w"], state["w"])  # lossy: what arrives, not what was sent


def test_read_header_takes_only_the_named_header():
    stream = iter(list(encode_model({"w": torch.ones(2)}, HEADER)))
    with pytest.raises(WireError, match="must start with a upload header"):
        read_header(stream, "upload")
    with pytest.raises(WireError, match="must start with a download header"):
        read_header(iter([]), "download")


@pytest.mark.parametrize("codec", ["int8", "topk0.1+int8", "fp16"])
def test_batchnorm_statistics_travel_exact_under_a_lossy_codec(codec: str) -> None:
    """A lossy update of a running variance can make it negative, and every prediction NaN
    (seen with top-k + int8 uploads): statistics named ``exact`` travel whole and exact,
    weights keep the codec."""
    from lssfl.common.codecs import ErrorFeedback, parse_codec
    from lssfl.common.models import SmallCNN, statistics_names

    torch.manual_seed(0)
    model = SmallCNN(width=8)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in reference.items()}
    for name, value in state.items():
        if name.endswith("running_var"):
            value.copy_(torch.linspace(1e-4, 5.0, value.numel()))  # small variances move far
        elif value.is_floating_point():
            value.add_(torch.randn_like(value) * 0.1)
    exact = statistics_names(model)
    assert exact == {f"features.{i}.{s}" for i in (1, 5) for s in ("running_mean", "running_var")}
    spec = parse_codec(codec)
    feedback = ErrorFeedback() if spec.topk is not None else None
    if feedback is not None:
        feedback.start_round(1)
    tensors = pack_state(state, spec, reference, feedback, exact=exact)
    held = held_state(tensors, reference)
    for t in tensors:
        if t.name in exact:
            assert t.codec == "raw" and not t.delta
            assert torch.equal(held[t.name], state[t.name])
        elif state[t.name].is_floating_point():
            assert t.codec == spec.name and t.delta
    assert not torch.equal(held["features.0.weight"], state["features.0.weight"])  # lossy
