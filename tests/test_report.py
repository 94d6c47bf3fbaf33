"""lssfl report: tables, HTML and PNG plots from metrics.jsonl, one run or several overlaid."""

import argparse
import csv
import importlib.util
import json
import shutil
import struct
import time
from pathlib import Path

import pytest

from lssfl import report
from lssfl.common.records import RoundRecord
from lssfl.report import load_run, read_metrics, summarize, write_comparison, write_report
from lssfl.report.command import default_out_dir, register
from lssfl.report.command import run as report_run
from lssfl.report.plots import PLOTS, silo_bars
from lssfl.report.runs import comm_seconds, default_target, time_splits, train_seconds
from lssfl.report.tables import COLUMNS

SILOS = ("silo-1", "silo-2", "silo-3")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(algorithm, rnd, acc, down, up, missing=(), wall=2.0, train=1.5, **codecs):
    silos = []
    for i, sid in enumerate(SILOS):
        gone = sid in missing
        silos.append({
            "silo_id": sid,
            "status": "idle" if rnd == 0 else ("missing" if gone else "ok"),
            "num_samples": 100 + i,
            "bytes_down": down,
            "bytes_up": 0 if gone else up,
            "bytes_down_raw": down,
            "bytes_up_raw": 0 if gone else up,
            "bytes_down_payload": down,
            "bytes_up_payload": 0 if gone else up,
            "train_seconds": None if (rnd == 0 or gone) else train + 0.1 * i,
            **({} if (rnd == 0 or gone) else {"train_loss": 1.0 / rnd}),
        })  # fmt: skip
    return {
        "round": rnd,
        "algorithm": algorithm,
        "status": "initial" if rnd == 0 else "ok",
        "global_accuracy": acc,
        "global_loss": 2.0 - acc,
        "bytes_down": sum(s["bytes_down"] for s in silos),
        "bytes_up": sum(s["bytes_up"] for s in silos),
        "bytes_down_raw": sum(s["bytes_down_raw"] for s in silos),
        "bytes_down_payload": sum(s["bytes_down_payload"] for s in silos),
        "bytes_up_raw": sum(s["bytes_up_raw"] for s in silos),
        "bytes_up_payload": sum(s["bytes_up_payload"] for s in silos),
        "cum_bytes_down": 0,  # the report sums rounds itself
        "cum_bytes_up": 0,
        "codec_down": "fp32",
        "codec_up": "fp32",
        "delta_downlink": False,
        "wall_seconds": wall,
        "num_results": 0 if rnd == 0 else len(SILOS) - len(missing),
        "missing": list(missing),
        "late_refused": 0,
        "silos": silos,
        "some_future_key": {"codec": "zstd"},  # unknown keys are ignored
    } | codecs


def _write_run(folder: Path, records) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _fedavg(folder: Path) -> Path:
    # MB per round: 0.6, 0.5 (silo-3 missing: no upload), 0.6 -> 1.700 in total
    return _write_run(folder, [
        _record("fedavg", 0, 0.30, 10, 5, wall=6.0),
        _record("fedavg", 1, 0.50, 100_000, 100_000),
        _record("fedavg", 2, 0.60, 100_000, 100_000, missing=("silo-3",), wall=9.0),
        _record("fedavg", 3, 0.70, 100_000, 100_000),
    ])  # fmt: skip


def _lss(folder: Path) -> Path:
    # MB per round: 0.45 -> 1.350 in total; its best (0.68, round 2) after 0.900 MB
    codecs = {"codec_down": "fp16", "delta_downlink": True, "codec_up": "int8+zstd"}
    return _write_run(folder, [
        _record("lss", 0, 0.30, 10, 5, wall=6.0, **codecs),
        _record("lss", 1, 0.62, 100_000, 50_000, train=3.0, **codecs),
        _record("lss", 2, 0.68, 100_000, 50_000, train=3.0, **codecs),
        _record("lss", 3, 0.66, 100_000, 50_000, train=3.0, **codecs),
    ])  # fmt: skip


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lssfl")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["report", *argv])


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _check_pngs(folder: Path) -> None:
    for name, _ in PLOTS:
        path = folder / name
        assert path.stat().st_size > 10_000, f"{name} is suspiciously small"
        width, height = _png_size(path)
        assert 600 <= width <= 2000 and 300 <= height <= 3000, (name, width, height)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return _fedavg(base / "fedavg-run"), _lss(base / "lss-run")


@pytest.fixture(scope="module")
def single(runs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "fedavg-run"
    shutil.copytree(runs[0], run_dir)
    assert report_run(_args(str(run_dir))) == 0
    return run_dir


@pytest.fixture(scope="module")
def comparison(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "report"
    assert report_run(_args(*map(str, runs), "--out", str(out))) == 0
    return out


def test_single_run_report_files_and_numbers(single):
    for name in ("metrics.csv", "report.md", "report.html"):
        assert (single / name).is_file(), name
    _check_pngs(single)
    with open(single / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(COLUMNS) and len(rows) == 5
    assert rows[3][-1] == "silo-3"  # round 2's missing silo
    html = (single / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<script" not in html
    for name, _ in PLOTS:
        assert f'<img src="{name}"' in html  # relative: next to report.html
    assert "<b>0.7000</b>" in html  # final accuracy
    assert "<b>1.700</b>" in html  # total MB down + up
    assert "0.100 / 0.000 (missing)" in html  # silo-3's bytes in round 2
    assert "0.7000 (3)" in html  # best accuracy and its round
    assert "MB to target" not in html  # one run, no --target: no target to reach
    md = (single / "report.md").read_text()
    assert "0.3000 (round 0, initial model) -> 0.7000 (round 3)" in md
    assert "report.html" in md


def test_comparison_summary_picks_the_right_values(runs, comparison):
    a, b = (load_run(d) for d in runs)
    target = default_target([a, b])
    assert target == pytest.approx(0.68)  # the best accuracy the weakest run (lss) reached
    fed, lss = summarize(a, target), summarize(b, target)
    assert (fed.final_accuracy, fed.best_accuracy, fed.best_round) == (0.70, 0.70, 3)
    assert (lss.final_accuracy, lss.best_accuracy, lss.best_round) == (0.66, 0.68, 2)
    assert fed.mb_total == pytest.approx(1.700045) and lss.mb_total == pytest.approx(1.350045)
    assert (fed.rounds_to_target, lss.rounds_to_target) == (3, 2)
    assert fed.mb_to_target == pytest.approx(1.700045)
    assert lss.mb_to_target == pytest.approx(0.900045)
    assert fed.missing_answers == 1 and lss.missing_answers == 0
    assert fed.seconds == pytest.approx(13.0)  # rounds 1-3; round 0 left out
    assert summarize(a, 0.99).mb_to_target is None

    _check_pngs(comparison)
    html = (comparison / "report.html").read_text()
    # Each run's label names its codecs.
    assert "fedavg, down fp32, up fp32 (fedavg-run)" in html
    assert "lss, down fp16 delta, up int8+zstd (lss-run)" in html
    for text in (
        "<b>0.7000</b>",
        "<b>0.6600</b>",
        "<b>1.700</b>",
        "<b>1.350</b>",
        "<b>1.700 (3)</b>",
        "<b>0.900 (2)</b>",
        "Target accuracy 0.6800",
    ):
        assert text in html, text  # fmt: skip
    with open(comparison / "summary.csv") as f:
        rows = {r["algorithm"]: r for r in csv.DictReader(f)}
    assert rows["lss"]["mb_to_target"] == "0.900" and rows["fedavg"]["final_accuracy"] == "0.7000"
    # the per-silo table shows the missing silo of the fedavg run only
    assert html.count("/ 0.000 (missing)") == 1


def test_target_option_and_unreached_target(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "write_plots", lambda *a, **k: [])  # the HTML is what counts
    out = tmp_path / "cmp"
    write_comparison(runs, out, target=0.69)
    html = (out / "report.html").read_text()
    assert "Target accuracy 0.6900 (set with --target)" in html
    assert "not reached" in html  # lss never reaches 0.69


def test_time_split_uses_the_slowest_silo():
    rec = RoundRecord.from_dict(_record("fedavg", 1, 0.5, 1, 1, wall=2.0, train=1.5))
    assert train_seconds(rec) == pytest.approx(1.7)  # silo-3: 1.5 + 0.2
    assert comm_seconds(rec) == pytest.approx(0.3)
    rec.wall_seconds = 1.0  # clock noise never gives negative communication
    assert comm_seconds(rec) == 0.0


def test_malformed_and_missing_metrics_raise_one_line(tmp_path):
    with pytest.raises(ValueError, match="metrics.jsonl: no such file") as exc:
        report_run(_args(str(tmp_path / "nowhere")))
    assert "\n" not in str(exc.value)

    bad = tmp_path / "bad"
    bad.mkdir()
    record = _record("fedavg", 1, 0.3, 1, 1)
    good = json.dumps(record)

    def changed(**keys):
        return json.dumps(record | keys)

    def silo_changed(**keys):
        return changed(silos=[record["silos"][0] | keys])

    without_codec = {k: v for k, v in record.items() if k != "codec_up"}
    cases = {
        "{not json": "metrics.jsonl:2: not valid JSON",
        "[1, 2]": "metrics.jsonl:2: expected a JSON object",
        changed(round=-1): "metrics.jsonl:2: 'round' must be an integer",
        changed(round=True): "metrics.jsonl:2: 'round' must be an integer",
        changed(global_accuracy="high"): "'global_accuracy' must be a number",
        silo_changed(bytes_up="x"): "silo 'silo-1': 'bytes_up' must be an integer",
        # Every figure of the round record, not only the ones the report draws.
        changed(bytes_up_raw=[3]): "'bytes_up_raw' must be an integer",
        silo_changed(num_samples="9"): "'num_samples' must",
        changed(missing="silo-2"): "'missing' must be a list",
        # A line from an older lssfl: one line naming the key, not a KeyError.
        json.dumps(without_codec): "missing key 'codec_up'",
    }
    for line, message in cases.items():
        (bad / "metrics.jsonl").write_text(f"{good}\n{line}\n{good}\n")
        with pytest.raises(ValueError, match=message) as exc:
            report_run(_args(str(bad)))
        assert str(bad / "metrics.jsonl") in str(exc.value) and "\n" not in str(exc.value)

    (bad / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rounds recorded"):
        write_comparison([bad], tmp_path / "out")


def test_launcher_reading_is_lenient(tmp_path):
    assert read_metrics(tmp_path) == []  # the coordinator has not written yet
    good = json.dumps(_record("fedavg", 0, 0.3, 1, 1))
    (tmp_path / "metrics.jsonl").write_text(f'{good}\n{{"round": 1, "glo')  # being written
    assert len(read_metrics(tmp_path)) == 1
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path, strict=True)


def test_write_report_without_metrics_does_not_fail(tmp_path):
    path = write_report(tmp_path)  # the launcher after a coordinator that never started
    assert path.name == "report.md" and "No rounds recorded" in path.read_text()
    assert (tmp_path / "metrics.csv").read_text().startswith("round,accuracy")


def test_repeated_round_keeps_the_last_line(tmp_path):
    run_dir = _write_run(tmp_path / "r", [
        _record("fedavg", 0, 0.3, 1, 1), _record("fedavg", 1, 0.4, 1, 1),
        _record("fedavg", 1, 0.5, 1, 1),
    ])  # fmt: skip
    assert load_run(run_dir).accuracy == [0.3, 0.5]


def test_default_out_and_help(tmp_path, monkeypatch):
    assert default_out_dir([tmp_path / "a"]) == tmp_path / "a"
    monkeypatch.chdir(tmp_path)
    out = default_out_dir([Path("a"), Path("b")])
    assert out.parent == Path("runs") and out.name.startswith("report-" + time.strftime("%Y"))
    parser = argparse.ArgumentParser(prog="lssfl")
    sub = parser.add_subparsers(dest="command")
    text = register(sub).format_help()
    assert "RUN_DIR" in text and "--out" in text and "lssfl report runs/" in text


def _screenshot_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHOT = _screenshot_tool()


@pytest.mark.skipif(not SHOT.find_chromium(), reason="no Chromium installed")
def test_screenshot_of_the_html(comparison, tmp_path):
    shot = SHOT.screenshot(comparison / "report.html", tmp_path / "shot.png", 1200, 1600)
    assert _png_size(shot) == (1200, 1600) and shot.stat().st_size > 50_000


def test_lss_pool_diagnostics_table(tmp_path):
    """The pool figures LSS silos report show per round and silo; a collapsed pool is red."""
    records = [_record("lss", r, 0.3 + 0.1 * r, 10, 10) for r in range(3)]
    for r, rec in enumerate(records[1:], start=1):
        for i, s in enumerate(rec["silos"]):
            s["train_distance_to_global"] = 0.01 * r
            # silo-2 collapses in round 2
            s["train_pool_spread"] = 0.04 if (r, i) == (2, 1) else 1.25
            s["train_pool_disagreement"] = 0.125
            s["train_reg_to_loss_grad"] = 0.25
    lss = _write_run(tmp_path / "lss", records)
    fedavg = _write_run(tmp_path / "fedavg", [_record("fedavg", r, 0.3, 10, 10) for r in range(3)])
    write_report(lss)
    html = (lss / "report.html").read_text()
    section = html.split("<h2>LSS pool</h2>")[1]
    assert "1.25 / 0.125 / 1.00e-02 / 0.250" in section
    assert section.count('class="miss"') == 1 and "0.04 / 0.125 / 2.00e-02" in section
    write_report(fedavg)
    assert "LSS pool" not in (fedavg / "report.html").read_text()


def test_a_comparison_prints_accuracy_side_by_side(runs, tmp_path, capsys):
    assert report_run(_args(*map(str, runs), "--out", str(tmp_path / "cmp"))) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("accuracy and cumulative MB (down + up, all silos) per round:")
    head, *rows = out[start + 1 : start + 6]
    assert head.split() == ["round", "fedavg", "lss", "lss", "-", "fedavg"]
    # round 2: fedavg 0.60 after 1.1 MB (0.6 + 0.5), lss 0.68 after 0.9 MB: +8 points
    assert rows[2].split() == ["2", "0.6000", "1.10", "MB", "0.6800", "0.90", "MB", "+8.00", "pts"]
    assert rows[0].split()[-2:] == ["+0.00", "pts"]


def test_report_keeps_down_and_up_apart_shows_absent_silos_and_start_up(tmp_path):
    records = [
        _record("fedavg", 0, 0.3, 10, 5, wall=6.0),
        _record("fedavg", 1, 0.5, 100_000, 50_000, wall=10.0),  # silos starting up
        _record("fedavg", 2, 0.6, 100_000, 50_000),
        _record("fedavg", 3, 0.7, 100_000, 50_000),
    ]
    records[2]["silos"] = records[2]["silos"][1:]  # silo-1 gone: no traffic in round 2
    run_dir = _write_run(tmp_path / "run", records)
    # silo-4 is enrolled and never joined.
    (run_dir / "config.yaml").write_text("silos: [silo-1, silo-2, silo-3, silo-4]\n")
    html = write_report(run_dir).read_text()

    run = load_run(run_dir)
    # Round 0 is start-up; round 1's communication beyond the later rounds' (0.3 s) is too.
    splits = {t.round: t for t in time_splits(run.records)}
    assert (splits[0].training, splits[0].startup, splits[0].rest) == (0.0, 6.0, 0.0)
    assert splits[1].training == pytest.approx(1.7)  # the slowest silo
    assert splits[1].startup == pytest.approx(8.0) and splits[1].rest == pytest.approx(0.3)
    assert splits[2].startup == 0.0 and splits[2].rest == pytest.approx(0.3)
    assert "<td>-</td><td>6.0</td><td>-</td>" in html  # round 0: start-up only
    assert "<td>1.7</td><td>8.0</td><td>0.3</td>" in html  # round 1: apart from training

    bars = {(b.round, b.silo, b.direction): b for b in silo_bars(run, run.silo_ids())}
    assert (bars[1, "silo-1", "down"].mb, bars[1, "silo-1", "up"].mb) == (0.1, 0.05)
    assert bars[2, "silo-1", "down"].status == "absent" and bars[2, "silo-1", "up"].mb == 0
    assert {bars[r, "silo-4", "up"].status for r in (1, 2, 3)} == {"absent"}
    assert bars[3, "silo-1", "up"].status == "ok"
    # In the per-silo table: silo-1 in round 2 and silo-4 in every round, marked.
    assert html.count('<td class="miss">absent</td>') == 1 + 3
    assert "silo-4</th>" in html
