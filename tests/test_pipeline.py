"""The codec pipeline of each direction (lssfl.common.pipeline): what each end keeps between
rounds, and that the download is byte for byte what the coordinator's own code sends."""

import pytest
import torch

from lssfl.common.codecs import ErrorFeedback, parse_codec
from lssfl.common.pipeline import DownlinkEncoder, HeldModel, UplinkEncoder
from lssfl.common.wire import (
    FP32,
    WireError,
    WireTensor,
    held_state,
    pack_state,
    stream_tensors,
)
from lssfl.proto import tensor_pb2 as pb

STATISTICS = frozenset({"bn.running_var"})


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 7, generator=g),
        "bn.running_var": torch.rand(7, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(seed),
        "e": torch.zeros(0),
    }


def _bytes(tensors: list[WireTensor]) -> list[tuple[pb.TensorSpec, bytes]]:
    return [(t.spec(), bytes(t.data)) for t in tensors]


def _stream(tensors, round_num, base_round=None):
    header = pb.ModelChunk(download=pb.DownloadHeader(run_id="r", round=round_num))
    if base_round is not None:
        header.download.base_round = base_round
    return list(stream_tensors(tensors, header))


def _prepare_download_as_the_coordinator_did(state, codec, delta_downlink, prev, exact):
    """server/coordinator.py's ``_prepare_download`` before the pipeline, minus its headers."""
    if delta_downlink and prev is not None:
        delta = pack_state(state, codec, prev, exact=exact)
        held = held_state(delta, prev)
        return pack_state(held), delta, held
    if delta_downlink or codec == FP32:
        return pack_state(state), None, state
    full = pack_state(state, codec, exact=exact)
    return full, None, held_state(full)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8+zstd", "topk0.2+int8"])
@pytest.mark.parametrize("delta", [False, True])
def test_downlink_sends_the_coordinator_s_bytes_round_after_round(codec, delta):
    spec = parse_codec(codec)
    if spec.topk is not None and not delta:
        pytest.skip("top-k downlinks need delta_downlink (checked in the config)")
    encoder = DownlinkEncoder(spec, delta=delta, exact=STATISTICS)
    prev = None
    for r in range(1, 4):
        state = _state(r)
        full, sent_delta, held = _prepare_download_as_the_coordinator_did(
            state, spec, delta, prev, STATISTICS
        )
        out = encoder.encode(state)
        assert _bytes(out.full) == _bytes(full)
        assert (out.delta is None) == (sent_delta is None)
        if sent_delta is not None:
            assert _bytes(out.delta) == _bytes(sent_delta)
        assert out.held.keys() == held.keys()
        assert all(torch.equal(out.held[k], held[k]) for k in held)
        assert encoder.held is out.held
        prev = held


def test_a_silo_holds_what_the_coordinator_holds_and_takes_deltas_against_it():
    encoder = DownlinkEncoder(parse_codec("int8"), delta=True, exact=STATISTICS)
    silo = HeldModel()
    assert silo.base_round(keep=True) is None  # nothing held: the whole model
    first = encoder.encode(_state(1))
    silo.decode(_stream(first.full, 1), round_num=1, keep=True, max_payload_bytes=1 << 30)
    assert silo.base_round(keep=True) == 1 and silo.base_round(keep=False) is None
    second = encoder.encode(_state(2))
    assert second.delta is not None
    got = silo.decode(
        _stream(second.delta, 2, base_round=1), round_num=2, keep=True, max_payload_bytes=1 << 30
    )
    assert all(torch.equal(got.state[k], encoder.held[k]) for k in encoder.held)
    # The statistics travel exact, whatever the codec.
    assert torch.equal(got.state["bn.running_var"], _state(2)["bn.running_var"])
    assert silo.round == 2 and silo.state is got.state
    third = encoder.encode(_state(3))
    with pytest.raises(WireError, match="delta against round 1, we hold 2"):
        silo.decode(
            _stream(third.delta, 3, base_round=1), round_num=3, keep=True, max_payload_bytes=1 << 30
        )
    silo.forget()
    assert silo.base_round(keep=True) is None and silo.state is None


def test_uplink_sends_the_update_with_statistics_exact_and_fp32_whole():
    received, trained = _state(1), _state(2)
    uplink = UplinkEncoder()
    whole = uplink.encode(trained, FP32, received=received, exact=STATISTICS, round_num=1)
    assert _bytes(whole) == _bytes(pack_state(trained))
    spec = parse_codec("int8")
    tensors = uplink.encode(trained, spec, received=received, exact=STATISTICS, round_num=1)
    assert _bytes(tensors) == _bytes(pack_state(trained, spec, received, exact=STATISTICS))
    by_name = {t.name: t for t in tensors}
    assert by_name["w"].delta and not by_name["bn.running_var"].delta
    held = held_state(tensors, received)
    assert torch.equal(held["bn.running_var"], trained["bn.running_var"])  # exact
    assert torch.allclose(held["w"], trained["w"], atol=0.05)  # lossy, round trip close


def test_uplink_top_k_keeps_its_residuals_between_rounds_and_replays_a_retried_round():
    spec = parse_codec("topk0.1+fp32")
    uplink, reference = UplinkEncoder(), ErrorFeedback()
    received = _state(0)
    for r in (1, 2):
        trained = _state(r)
        reference.start_round(r)
        expected = pack_state(trained, spec, received, reference, exact=STATISTICS)
        got = uplink.encode(trained, spec, received=received, exact=STATISTICS, round_num=r)
        assert _bytes(got) == _bytes(expected)
        kept = uplink.feedback.residual("w")
        assert kept is not None and kept.abs().sum() > 0  # what top-k dropped, carried over
    # Round 2 trained again (the coordinator restarted): the same bytes as its first try.
    again = uplink.encode(_state(2), spec, received=received, exact=STATISTICS, round_num=2)
    assert _bytes(again) == _bytes(got)
    # Nothing is lost: what was sent plus the residual is the update.
    sent = held_state(got, received)["w"] - received["w"]
    update = _state(2)["w"] - received["w"]
    carried_in = _state(1)["w"] - received["w"] - (held_state(
        pack_state(_state(1), spec, received, ErrorFeedback(), exact=STATISTICS), received
    )["w"] - received["w"])  # fmt: skip
    assert torch.allclose(sent + uplink.feedback.residual("w"), update + carried_in, atol=1e-5)
