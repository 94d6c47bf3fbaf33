"""Codecs through the real service: what the meter says crossed the wire, and that both
ends hold the same model when the downlink sends only changes."""

import json

import pytest
import torch

from lssfl.common.codecs import parse_codec
from lssfl.common.wire import decode_model, pack_state, stream_tensors
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import tensor_pb2 as pb
from tests.conftest import Harness, read_jsonl, run_lssfl


@pytest.mark.slow  # coordinator and silos as OS processes
@pytest.mark.parametrize(
    "uplink, limit", [("int8", 0.27), ("topk0.01+int8+zstd", 0.05)]
)  # fmt: skip
def test_uplink_bytes_in_a_real_run(tmp_path, write_config, uplink, limit):
    config = write_config(
        silos=["silo-1", "silo-2"],
        model={"init": "random"},
        coordinator={"save_uploads": True},
        compression={"uplink": uplink, "downlink": "fp16", "delta_downlink": True},
    )
    run_dir = tmp_path / "runs" / "c"
    proc = run_lssfl("run", "--config", str(config), "--run-dir", str(run_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_jsonl(run_dir / "metrics.jsonl")
    for rec in records[1:]:
        assert rec["codec_up"] == parse_codec(uplink).name and rec["num_results"] == 2
        # Serialized gRPC bytes against the fp32 size of the same tensors, as metered.
        assert rec["bytes_up"] <= limit * rec["bytes_up_raw"], rec
        assert rec["bytes_up_payload"] < rec["bytes_up"]
    # Round 1: silos hold nothing yet, so the model goes down whole; then only fp16 changes.
    assert records[1]["bytes_down"] >= records[1]["bytes_down_raw"]
    assert records[2]["bytes_down"] <= 0.51 * records[2]["bytes_down_raw"]
    assert records[2]["cum_bytes_up"] == sum(r["bytes_up"] for r in records[:3])
    _check_round_one_uploads(config, run_dir, records[1])


def _check_round_one_uploads(config, run_dir, record) -> None:
    """Round 1 again, here: each silo's training from the round-0 model it received whole,
    its lossy upload encoded as the silo encodes it and decoded. The coordinator must have
    rebuilt exactly that, and aggregated the weighted average of it."""
    from safetensors.torch import load_file

    from lssfl.common.codecs import ErrorFeedback, decode_tensor
    from lssfl.common.config import load_config
    from lssfl.common.models import build_model, statistics_names
    from lssfl.common.seeding import derive_seed
    from lssfl.dataprep.dataroot import prepare_data_root
    from lssfl.dataprep.splits import load_split
    from lssfl.training.trainers import make_trainer

    cfg = load_config(config)
    codec = parse_codec(cfg.compression.uplink)
    data = prepare_data_root(cfg)
    received = load_file(run_dir / "checkpoints/round-0000.safetensors")
    uploads, weights = {}, {}
    for silo in cfg.silos:
        split = load_split(data.silo_dirs[silo])
        model = build_model(json.loads(json.dumps(cfg.model_spec)))
        model.load_state_dict(received)
        seed = derive_seed(cfg.run.seed, 1, silo)
        torch.manual_seed(seed)
        make_trainer(json.loads(json.dumps(cfg.trainer))).train(model, split.x, split.y, seed=seed)
        # What the silo sends, decoded here tensor by tensor (not through the wire decoder
        # the coordinator runs): deltas on top of the received model.
        # BatchNorm statistics travel exact (raw), whole.
        state = model.state_dict()
        sent = pack_state(state, codec, received, ErrorFeedback(), statistics_names(model))
        assert {t.name for t in sent if t.codec == "raw"} == statistics_names(model)
        expected = {
            t.name: state[t.name]
            if t.codec == "raw"
            else decode_tensor(t.data, parse_codec(t.codec), t.shape, t.dtype)
            + (received[t.name] if t.delta else 0)
            for t in sent
        }
        uploads[silo] = load_file(run_dir / f"uploads/round-0001/{silo}.safetensors")
        for name, value in expected.items():
            assert torch.equal(uploads[silo][name], value), (silo, name)
        # Lossy, yet not the received model: the silo's training came through.
        assert not torch.equal(uploads[silo]["head.3.weight"], received["head.3.weight"])
        weights[silo] = split.num_samples
    assert {s["silo_id"]: s["num_samples"] for s in record["silos"]} == weights
    aggregate = load_file(run_dir / "checkpoints/round-0001.safetensors")
    total = sum(weights.values())
    for name, value in aggregate.items():
        if value.is_floating_point():
            average = sum(w * uploads[s][name].double() for s, w in weights.items()) / total
            torch.testing.assert_close(value, average.float(), rtol=1e-5, atol=1e-6)


def test_delta_downlink_reconstruction_matches_the_coordinator(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 32, generator=g), "n": torch.tensor(3)}
    compression = {"uplink": "int8", "downlink": "int8", "delta_downlink": True}
    h = Harness(tmp_path, state, silos=("s1",), compression=compression)
    try:
        h.join("s1")
        h.open_round(1)
        first = h.download()  # nothing held: the whole model, exact
        assert torch.equal(first.state["w"], state["w"])
        update = {"w": first.state["w"] + 0.01, "n": torch.tensor(4)}
        header = pb.ModelChunk(
            upload=pb.UploadHeader(run_id="run1", round=1, silo_id="s1", num_samples=10)
        )
        msgs = stream_tensors(pack_state(update, parse_codec("int8"), first.state), header)
        assert h.upload(None, messages=msgs).accepted
        h.thread.join(10)
        assert (h.coordinator.global_state["w"] - update["w"]).abs().max() < 1e-3

        h.open_round(2)
        stream = h.stub.DownloadModel(
            cpb.DownloadRequest(silo_id="s1", run_id="run1", round=2, have_round=1), timeout=10
        )
        delta = decode_model(
            stream, header_kind="download", max_payload_bytes=1 << 30, reference=first.state
        )
        assert delta.header.download.base_round == 1
        # int8 of the change (+ a scale and zero point per row), not fp32
        assert delta.payload_bytes < 0.32 * 64 * 32 * 4
        # The silo holds exactly what the coordinator decodes uploads against.
        assert torch.equal(delta.state["w"], h.coordinator.downlink.held["w"])
        assert int(delta.state["n"]) == 4
        # A silo that lost its copy gets that same model whole.
        full = h.download(round_num=2)
        assert torch.equal(full.state["w"], delta.state["w"])
    finally:
        h.close()
