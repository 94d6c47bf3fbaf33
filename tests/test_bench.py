"""The benchmarks that acceptance is measured with still run, and report what they claim.

Small models and few repeats: these check the JSON and the figures that do not depend on
the machine's speed (sizes, ratios of bytes, exact round trips), never timings.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lssfl.common.models import build_model

# Real OS processes, gRPC over sockets: minutes on 2 cores (`pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(name: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *args, "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_transport_receives_the_model_exactly_on_every_path():
    # The bench asserts each path's tensors equal the sent ones; a wrong byte exits non-zero.
    out = run_bench("transport.py", "--model", "cnn", "--repeats", "2")
    state = build_model({"name": "cnn"}).state_dict()
    assert out["mb"] == round(sum(t.numel() * t.element_size() for t in state.values()) / 1e6, 2)
    assert set(out["page_faults"]) == {"grpc", "grpc_bare", "socket", "socket_warm"}
    assert min(out["grpc_s"], out["socket_s"], out["grpc_bare_s"], out["socket_warm_s"]) > 0


def test_codec_ratios_on_resnet18():
    codecs = run_bench("codec.py", "--repeats", "1")["codecs"]
    assert codecs["fp32"]["ratio"] == 1.0 and codecs["fp32"]["rel_error"] == 0.0
    assert 0.25 <= codecs["int8"]["ratio"] <= 0.26
    assert codecs["int8+zstd"]["ratio"] < codecs["int8"]["ratio"]
    assert codecs["topk0.01+int8+zstd"]["ratio"] < 0.02
    assert all(c["encode_MBps"] > 0 and c["decode_MBps"] > 0 for c in codecs.values())


def test_lss_step_reports_both_trainers():
    out = run_bench("lss_step.py", "--model", "cnn", "--repeats", "2", "--warmup", "1")
    assert out["fedavg_step_ms"] > 0 and out["lss_step_ms"] > 0
    assert out["ratio"] == pytest.approx(out["lss_step_ms"] / out["fedavg_step_ms"], rel=0.01)
    assert out["lss_peak_mb"] >= out["before_setup_mb"]


def test_rounds_to_accuracy_json_and_bytes_to_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures the LSS acceptance is read from: per-seed curves and bytes to a target."""
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/rounds_to_accuracy.py` has it
    spec = importlib.util.spec_from_file_location("rta", BENCH / "rounds_to_accuracy.py")
    assert spec is not None and spec.loader is not None
    rta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rta)
    assert {
        "fedavg",
        "fedavg-compute",
        "fedavg-frozen",
        "fedprox",
        "swa",
        "lss",
        "lss-int8",
        "lss-paper",
    } <= set(rta.ARMS)
    assert set(rta.REGIMES) == {"generalist", "partial", "label"}

    def recs(accs: list[float], per_round: int) -> list[dict]:
        return [
            {"global_accuracy": a, "cum_bytes_down": r * per_round, "cum_bytes_up": r * per_round}
            for r, a in enumerate(accs)
        ]

    results = {
        "fedavg": {0: recs([0.1, 0.2, 0.5], 100), 1: recs([0.1, 0.3, 0.6], 100)},
        "lss-int8": {0: recs([0.1, 0.5, 0.7], 25), 1: recs([0.1, 0.4, 0.5], 25)},
    }
    arms = rta.arms_json(results)
    assert arms["fedavg"]["accuracy"] == [[0.1, 0.2, 0.5], [0.1, 0.3, 0.6]]
    assert arms["lss-int8"]["cum_bytes"][0] == [0, 50, 100]
    reach = rta.bytes_to_target(arms)
    # seed 0: 0.5 reached in round 1 with 50 of fedavg's 400 bytes; seed 1 never reaches 0.6
    assert reach["lss-int8"]["per_seed"][0] == {"round": 1, "bytes": 50, "ratio": 0.125}
    assert reach["lss-int8"]["per_seed"][1]["round"] is None
    assert reach["lss-int8"]["max_ratio"] is None
    assert reach["fedavg"]["max_ratio"] == 1.0
    diffs = rta.paired(arms)["lss-int8 - fedavg"]
    assert diffs[1]["per_seed"] == pytest.approx([0.3, 0.1])
    assert diffs[2]["diff_mean"] == pytest.approx(0.05)
    table = rta.summarise(arms)
    assert table["lss-int8"][1]["accuracy_mean"] == pytest.approx(0.45)
    assert table["fedavg"][2]["cumulative_mb"] == pytest.approx(400 / 1e6)
    assert "| lss-int8 | 10.0 (0.0) | 45.0 (7.1) | 60.0 (14.1) |" in rta.markdown(table)
    assert arms["fedavg"]["pool"] is None


def test_rounds_to_accuracy_summarises_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alive and soup-not-worse fractions count silo-rounds; rounds without a pool do not."""
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("rta", BENCH / "rounds_to_accuracy.py")
    assert spec is not None and spec.loader is not None
    rta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rta)

    def silo(spread: float, soup: float) -> dict:
        return {"silo_id": "s", "train_pool_spread": spread, "train_pool_disagreement": 0.1,
                "train_soup_loss": soup, "train_member_loss": 1.0}  # fmt: skip

    by_seed = {
        0: [{"silos": []}, {"silos": [silo(0.5, 0.9), silo(0.05, 1.1)]}],
        1: [{"silos": [{"silo_id": "s", "status": "missing"}]}, {"silos": [silo(1.5, 1.0)]}],
    }
    pool = rta.pool_summary(by_seed)
    assert pool["silo_rounds"] == 3
    assert pool["alive_fraction"] == pytest.approx(2 / 3)  # 0.05 is under ALIVE_SPREAD
    assert pool["soup_not_worse_fraction"] == pytest.approx(2 / 3)  # 1.1 > 1.0
    assert pool["mean_pool_spread"] == pytest.approx((0.5 + 0.05 + 1.5) / 3)


def test_regimes_change_only_the_data_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import regimes

    base = {"run": {"seed": 0}, "data": {"kind": "embedded", "root": "data/embedded"}}
    assert regimes.apply_regime(base, "generalist") == base
    label = regimes.apply_regime(base, "label")
    assert label["data"] == {"kind": "embedded", "root": "data/embedded-label",
                             "domains": ["original"], "alpha": 0.1}  # fmt: skip
    assert base["data"] == {"kind": "embedded", "root": "data/embedded"}  # not changed
    partial = regimes.apply_regime(base, "partial")["data"]
    assert set(partial["pretrain_domains"]) < {
        "original",
        "inverted",
        "rotated",
        "colored",
        "noisy",
    }


def test_coordinator_scale_rows_and_bytes_add_up():
    """One tiny round: each silo's download and upload of the model, and nothing more, in the
    round's payload counts; the row carries every figure the README table reads."""
    out = run_bench("coordinator_scale.py", "--silos", "3", "--model", "mlp", "--processes", "1")
    state = build_model({"name": "mlp"}).state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    (row,) = out["rows"]
    assert row["silos"] == 3
    assert row["bytes_down_payload"] == row["bytes_up_payload"] == 3 * model_bytes
    assert row["bytes_down_payload_received"] == 3 * model_bytes
    assert row["bytes_up"] > row["bytes_up_payload"]  # framing and headers on top
    assert row["peak_rss_mb"] >= row["idle_rss_mb"] > 0
    assert row["round_seconds"] > 0
    expected = (row["bytes_down"] + row["bytes_up"]) / 1e6 / row["round_seconds"]
    assert row["mb_per_s"] == pytest.approx(expected, rel=0.01)
