"""TLS, mutual TLS and per-silo tokens on a real gRPC server over loopback."""

import hashlib
import json
import subprocess

import grpc
import pytest
import torch

from lssfl.common.config import parse_config
from lssfl.common.rpc import coordinator_stub
from lssfl.common.security import (
    CA_CERT,
    TOKENS,
    TokenTable,
    channel_credentials,
    make_certs,
    silo_files,
)
from lssfl.common.wire import encode_model
from lssfl.dataprep.splits import save_split
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import coordinator_pb2_grpc as cgrpc
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.coordinator import Coordinator
from lssfl.server.service import serve
from lssfl.server.store import RoundStore
from tests.conftest import lssfl_cmd, read_jsonl, run_lssfl, wait_for

SILOS = ["silo-1", "silo-2", "silo-3"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_certs(folder, SILOS, ["localhost", "127.0.0.1"])
    other = tmp_path_factory.mktemp("other-ca")
    make_certs(other, SILOS, ["localhost", "127.0.0.1"])
    return folder, other


def _server(tmp_path, folder, **security):
    cfg = parse_config({
        "silos": SILOS,
        "model": {"name": "mlp", "init": "random"},
        "data": {"kind": "folders"},
        "security": {"dir": str(folder), **security},
    })  # fmt: skip
    c = Coordinator(cfg, RoundStore(tmp_path), {"w": torch.zeros(2)}, lambda s: (0.0, 0.0))
    server, port = serve(c, "127.0.0.1", 0)
    return server, port


def _join(port, silo, *, folder=None, mtls_silo=None, token_silo=None, token=None):
    if folder is None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    else:
        cert, key, _ = silo_files(folder, mtls_silo) if mtls_silo else (None, None, None)
        creds = channel_credentials(folder / CA_CERT, cert, key)
        channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
    if token_silo:
        token = silo_files(folder, token_silo)[2].read_text().strip()
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        return cgrpc.CoordinatorStub(channel).Join(
            cpb.JoinRequest(silo_id=silo, num_samples=1), timeout=5, metadata=metadata
        )
    finally:
        channel.close()


def _refused(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_tokens_are_checked_on_every_call(tmp_path, certs, caplog):
    folder, _ = certs
    server, port = _server(tmp_path, folder, tls=True, tokens=True, revoked=["silo-3"])
    try:
        assert _join(port, "silo-1", folder=folder, token_silo="silo-1").run_id
        code, details = _refused(lambda: _join(port, "silo-1", folder=folder))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in details
        code, details = _refused(lambda: _join(port, "silo-1", folder=folder, token="guess"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "token is not valid" in details
        # A silo's token does not let it speak for another silo.
        code, _ = _refused(lambda: _join(port, "silo-1", folder=folder, token_silo="silo-2"))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, details = _refused(lambda: _join(port, "silo-3", folder=folder, token_silo="silo-3"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details
        # Plain-text clients do not get through a TLS port at all.
        token = silo_files(folder, "silo-1")[2].read_text().strip()
        code, _ = _refused(lambda: _join(port, "silo-1", token=token))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0).wait()
    # Refused from the call's metadata, before its request is read.
    assert "refused Join: missing bearer token" in caplog.text
    assert "refused revoked silo 'silo-3'" in caplog.text


def test_an_upload_is_checked_against_the_silo_its_header_names(tmp_path, certs, caplog):
    folder, _ = certs
    server, port = _server(tmp_path, folder, tls=True, tokens=True, revoked=["silo-3"])
    channel = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(folder / CA_CERT))

    def upload(header_silo, token_silo):
        token = silo_files(folder, token_silo)[2].read_text().strip()
        header = pb.ModelChunk(upload=pb.UploadHeader(silo_id=header_silo, round=1))
        return coordinator_stub(channel).UploadResult(
            iter(list(encode_model({"w": torch.ones(2)}, header))),
            timeout=5,
            metadata=(("authorization", f"Bearer {token}"),),
        )

    try:
        # silo-1's token, an upload claiming to be silo-2's: refused before the coordinator.
        code, details = _refused(lambda: upload("silo-2", "silo-1"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid for silo 'silo-2'" in details
        code, details = _refused(lambda: upload("silo-3", "silo-3"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details
        # Its own token passes the check and reaches the coordinator (which has not seen it).
        code, details = _refused(lambda: upload("silo-1", "silo-1"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "must join first" in details
    finally:
        channel.close()
        server.stop(0).wait()
    assert "refused wrong token for silo 'silo-2'" in caplog.text


def test_mutual_tls_needs_a_certificate_from_our_ca_issued_to_the_silo(tmp_path, certs):
    folder, other = certs
    server, port = _server(tmp_path, folder, tls=True, mutual_tls=True)
    try:
        assert _join(port, "silo-2", folder=folder, mtls_silo="silo-2").run_id
        code, details = _refused(lambda: _join(port, "silo-1", folder=folder, mtls_silo="silo-2"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not issued to silo 'silo-1'" in details
        # No client certificate, or one from another CA: the handshake fails.
        code, _ = _refused(lambda: _join(port, "silo-1", folder=folder))
        assert code == grpc.StatusCode.UNAVAILABLE
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        (mixed / CA_CERT).write_bytes((folder / CA_CERT).read_bytes())
        for f in silo_files(other, "silo-1")[:2]:
            (mixed / f.name).write_bytes(f.read_bytes())
        code, _ = _refused(lambda: _join(port, "silo-1", folder=mixed, mtls_silo="silo-1"))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0).wait()


@pytest.mark.slow  # lssfl processes
def test_lssfl_run_with_tls_and_tokens_end_to_end(tmp_path, write_config):
    certs = tmp_path / "certs"
    config = write_config(
        silos=["silo-1", "silo-2"],
        run={"rounds": 2},
        model={"init": "random"},
        security={"dir": str(certs), "tls": True, "mutual_tls": True, "tokens": True},
    )
    run_dir = tmp_path / "runs" / "tls"
    out = open(tmp_path / "launcher.out", "w+")  # noqa: SIM115
    launcher = subprocess.Popen(
        lssfl_cmd("run", "--config", str(config), "--run-dir", str(run_dir)),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: (run_dir / "coordinator.addr").exists(), 120, "the coordinator")
        port = int((run_dir / "coordinator.addr").read_text().rsplit(":", 1)[1])
        # A plaintext client with a valid silo id and token gets nowhere: the port speaks TLS.
        token = silo_files(certs, "silo-1")[2].read_text().strip()
        code, _ = _refused(lambda: _join(port, "silo-1", token=token))
        assert code == grpc.StatusCode.UNAVAILABLE
        # The same coordinator, still up, answers a client with the CA and a silo certificate.
        cert, key, _ = silo_files(certs, "silo-1")
        health = run_lssfl(
            "health", f"127.0.0.1:{port}", "--ca", str(certs / CA_CERT),
            "--cert", str(cert), "--key", str(key),
        )  # fmt: skip
        assert health.returncode == 0 and health.stdout.strip().endswith("SERVING"), health
        assert launcher.wait(300) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        out.seek(0)
        output = out.read()
        out.close()
    assert "made a demo CA" in output, output
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert records[-1]["round"] == 2 and records[-1]["num_results"] == 2
    # The coordinator keeps only the tokens' SHA-256: no file in the run folder (database,
    # logs, config, checkpoints) nor the token table holds a token itself.
    tokens = {s: silo_files(certs, s)[2].read_text().strip() for s in ("silo-1", "silo-2")}
    table = json.loads((certs / TOKENS).read_text())
    assert table == {s: hashlib.sha256(t.encode()).hexdigest() for s, t in tokens.items()}
    written = [p for p in run_dir.rglob("*") if p.is_file()] + [certs / TOKENS]
    assert len(written) > 10 and any(p.name == "state.db" for p in written)
    for path in written:
        data = path.read_bytes()
        for token in tokens.values():
            assert token.encode() not in data, f"{path} holds a raw token"


def test_lssfl_certs_from_a_config_makes_material_a_server_and_silo_accept(tmp_path, write_config):
    config = write_config(silos=["silo-1", "silo-2"])
    folder = tmp_path / "made"
    proc = run_lssfl("certs", "--out", str(folder), "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert f"2 silo certificates and tokens to {folder}" in proc.stdout
    server, port = _server(tmp_path / "run", folder, tls=True, mutual_tls=True, tokens=True)
    try:
        # Each silo, with its own certificate and token, is let in as itself.
        for silo in ("silo-1", "silo-2"):
            assert _join(port, silo, folder=folder, mtls_silo=silo, token_silo=silo).run_id
        code, _ = _refused(
            lambda: _join(port, "silo-1", folder=folder, mtls_silo="silo-1", token_silo="silo-2")
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0).wait()


@pytest.mark.slow  # lssfl processes
def test_silo_credential_errors_are_one_line(tmp_path, certs):
    folder, _ = certs
    data = tmp_path / "data"
    save_split(data, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    base = ["silo", "--coordinator", "127.0.0.1:9", "--silo-id", "silo-1", "--data", str(data)]
    cases = [
        (["--cert", str(folder / "silo-1.pem")], "--cert/--key need --ca"),
        (["--token-file", str(tmp_path / "nope.token")], "cannot read token file"),
        (["--ca", str(folder / CA_CERT), "--cert", str(folder / "silo-1.pem")], "go together"),
    ]
    for extra, message in cases:
        proc = run_lssfl(*base, *extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("lssfl: error: ") and message in proc.stderr
        assert proc.stderr.count("\n") == 1


def test_health_of_an_unreachable_coordinator_is_one_line():
    proc = run_lssfl("health", "127.0.0.1:9", "--timeout", "2")
    assert proc.returncode == 1
    assert proc.stderr.startswith("lssfl: error: 127.0.0.1:9: UNAVAILABLE")


@pytest.mark.slow  # lssfl processes
def test_health_check_through_mutual_tls(tmp_path, certs):
    folder, _ = certs
    server, port = _server(tmp_path, folder, tls=True, mutual_tls=True)
    address, ca = f"127.0.0.1:{port}", str(folder / CA_CERT)
    cert, key, _ = silo_files(folder, "silo-1")
    try:
        ok = run_lssfl("health", address, "--ca", ca, "--cert", str(cert), "--key", str(key))
        assert ok.returncode == 0 and ok.stdout.strip() == f"{address}: SERVING", ok.stderr
        # Without a client certificate the handshake fails, and the check says what is missing.
        refused = run_lssfl("health", address, "--ca", ca, "--timeout", "3")
        assert refused.returncode == 2
        assert refused.stderr == (
            f"lssfl: error: coordinator {address} requires a client certificate (mutual TLS): "
            "give --cert and --key\n"
        )
        half = run_lssfl("health", address, "--ca", ca, "--cert", str(cert))
        assert half.returncode == 2 and "--cert and --key go together" in half.stderr
        nope = tmp_path / "nope.pem"
        missing = run_lssfl("health", address, "--ca", str(nope))
        assert missing.returncode == 2
        assert missing.stderr == (
            f"lssfl: error: cannot read CA certificate {nope}: No such file or directory\n"
        )
    finally:
        server.stop(0).wait()


def test_a_growing_consortium_keeps_old_silos_valid_and_revocation_reaches_a_live_server(
    tmp_path,
):
    folder = tmp_path / "certs"
    made = run_lssfl("certs", "--out", str(folder), "--silos", "silo-1", "silo-2")
    assert made.returncode == 0, made.stderr
    assert (folder / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (folder / "silo-1.token").stat().st_mode & 0o777 == 0o600
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    # Making the folder again would replace the CA and every token: refused.
    again = run_lssfl("certs", "--out", str(folder), "--silos", "silo-1", "silo-2", "silo-3")
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "already holds a CA" in again.stderr and "--force" in again.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    added = run_lssfl("certs", "add-silo", "silo-3", "--out", str(folder))
    assert added.returncode == 0, added.stderr
    assert "silo-3.pem, silo-3.key, silo-3.token" in added.stdout
    for name, content in before.items():
        if name != "tokens.json":
            assert (folder / name).read_bytes() == content, f"{name} changed"
    twice = run_lssfl("certs", "add-silo", "silo-3", "--out", str(folder))
    assert twice.returncode == 2 and "silo-3.pem already exists; --force" in twice.stderr

    server, port = _server(tmp_path, folder, tls=True, mutual_tls=True, tokens=True)
    try:
        for silo in SILOS:  # old silos' certificates and tokens, and the new one's
            assert _join(port, silo, folder=folder, mtls_silo=silo, token_silo=silo).run_id
        revoked = run_lssfl("certs", "revoke", "silo-2", "--out", str(folder))
        assert revoked.returncode == 0, revoked.stderr
        assert (folder / "revoked.txt").read_text() == "silo-2\n"
        # The running server refuses it from its next call on; the others carry on.
        code, details = _refused(
            lambda: _join(port, "silo-2", folder=folder, mtls_silo="silo-2", token_silo="silo-2")
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details
        assert _join(port, "silo-1", folder=folder, mtls_silo="silo-1", token_silo="silo-1").run_id
    finally:
        server.stop(0).wait()
    # Revoked for good: its token's hash is gone from the table a restarted coordinator reads.
    assert "silo-2" not in TokenTable.load(folder / "tokens.json").hashes


def test_certs_subcommands_reject_bad_input_in_one_line(tmp_path):
    cases = [
        (["add-silo", "silo-1", "--out", str(tmp_path / "none")], "has no ca.pem"),
        (["revoke", "silo-1", "--out", str(tmp_path / "none")], "holds no CA"),
        (["add-silo", "--out", str(tmp_path)], "name the silo id"),
        (["--out", str(tmp_path)], "give the silo ids with --silos or --config"),
        (["silo-1", "--out", str(tmp_path)], "invalid choice: 'silo-1'"),
    ]
    for args, message in cases:
        proc = run_lssfl("certs", *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "none").exists()
