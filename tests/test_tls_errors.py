"""TLS mistakes said in one line: real `lssfl coordinator` and `lssfl silo` processes."""

import signal
import subprocess

from lssfl.common.security import CA_CERT, make_certs, silo_files
from lssfl.server.corelog import CoreLogFilter
from tests.conftest import free_port, lssfl_cmd, run_lssfl, wait_for


def test_silo_tls_mistakes_are_one_line_and_the_coordinator_names_the_peer(tmp_path, write_config):
    certs, other = tmp_path / "certs", tmp_path / "other"
    make_certs(certs, ["silo-1", "silo-2", "silo-3"], ["localhost", "127.0.0.1"])
    make_certs(other, ["silo-1"], ["localhost", "127.0.0.1"])
    config = write_config(
        model={"init": "random"},
        security={"dir": str(certs), "tls": True, "mutual_tls": True, "tokens": True},
    )
    run_dir, port = tmp_path / "run", free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "coordinator.log"
    with open(log_path, "wb") as log:
        coordinator = subprocess.Popen(
            lssfl_cmd("coordinator", "--config", str(config), "--run-dir", str(run_dir),
                      "--port", str(port)),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: (run_dir / "coordinator.addr").exists(), 120, "the coordinator")
        data = tmp_path / "data" / "silo-1"
        cert, key, token = silo_files(certs, "silo-1")
        base = ["silo", "--coordinator", address, "--silo-id", "silo-1", "--data", str(data),
                "--max-wait", "20", "--token-file", str(token)]  # fmt: skip
        cases = [
            ([], f"coordinator {address} uses TLS: give --ca"),
            (["--ca", str(certs / CA_CERT)], "requires a client certificate (mutual TLS): give"),
            (
                ["--ca", str(other / CA_CERT), "--cert", str(cert), "--key", str(key)],
                f"is not signed by the CA in {other / CA_CERT}: wrong --ca file",
            ),
            (
                [
                    "--ca",
                    str(certs / CA_CERT),
                    *("--cert", str(other / "silo-1.pem")),
                    *("--key", str(other / "silo-1.key")),
                ],
                f"refused the client certificate {other / 'silo-1.pem'}: it is not issued",
            ),  # fmt: skip
        ]
        for extra, message in cases:
            proc = run_lssfl(*base, *extra)
            # One line, at once (not after --max-wait of "coordinator unavailable").
            assert proc.returncode == 2, (extra, proc.stderr)
            errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
            assert len(errors) == 1 and errors[0].startswith("lssfl: error: "), proc.stderr
            assert message in errors[0], (extra, proc.stderr)
            assert "unavailable" not in proc.stderr
        health = run_lssfl("health", address, "--ca", str(certs / CA_CERT))
        assert health.returncode == 2 and "requires a client certificate" in health.stderr
    finally:
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(60)
    text = log_path.read_text()
    assert "ssl_transport_security" not in text and "handshaker.cc" not in text
    failures = [line for line in text.splitlines() if "TLS handshake with ipv4:127.0.0.1:" in line]
    expected = [
        "not a TLS client (a silo without --ca?)",
        "no client certificate (mutual TLS: the silo needs --cert and --key)",
        "closed the connection mid-handshake",
        "its client certificate is not from this run's CA",
    ]
    for meaning in expected:
        assert any(meaning in line for line in failures), (meaning, text)
    assert all(" coordinator " in line and "WARNING" in line for line in failures)


def test_core_log_filter_joins_a_multi_line_failure_into_one_warning(caplog):
    import logging

    lines = [
        "I1202 03:00:08.560 12721 trace.cc:91] gRPC Tracers: handshaker",
        "I1202 03:00:08.561 12721 ssl_transport_security.cc:2563] Handshake failed with error",
        "I1202 03:00:08.561 12721 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: "
        "Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000c0:SSL "
        "routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid: OK",
        "=== Source Location Trace: === ",
        "src/core/util/status_helper.cc:68",
        " shutdown=false index=2, args={grpc.internal.endpoint_peer_address=ipv4:10.0.0.7:37236,"
        " grpc.x=1}",
        "E1202 03:00:09.000 12721 chttp2_server.cc:1] bind failed",
        "Fatal Python error: something else entirely",
    ]
    core = CoreLogFilter(logging.getLogger("t"))
    with caplog.at_level(logging.WARNING):
        kept = [k for k in map(core.feed, lines) if k is not None]
    assert kept == lines[-2:]  # core errors and non-core lines pass; chatter does not
    assert caplog.messages == [
        "TLS handshake with ipv4:10.0.0.7:37236 failed: no client certificate (mutual TLS: "
        "the silo needs --cert and --key)"
    ]
