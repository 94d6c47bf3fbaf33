"""A client's TLS mistakes, said in one line instead of ``coordinator unavailable`` forever.

gRPC reports a failed handshake as UNAVAILABLE, like a coordinator that is down. Some
failures name their cause in the status details (the certificate does not verify, the
server does not speak TLS); others only read "Socket closed": a plaintext client at a TLS
port, or a client without a certificate under mutual TLS. For those, one TLS handshake
with Python's ``ssl`` module tells the cases apart.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

# Substrings of gRPC's status details (BoringSSL reason codes).
_NOT_TLS = ("WRONG_VERSION_NUMBER",)
_UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED", "BAD_SIGNATURE", "certificate signature failure")
_WRONG_NAME = ("Peer name", "not in peer certificate")
_CLOSED = ("Socket closed", "Connection reset", "Broken pipe")


class TlsMisconfigured(ValueError):
    """This client cannot talk to the coordinator as set up; retrying will not help."""


def _probe(address: str, cert: Path | None, key: Path | None, timeout: float) -> str | None:
    """'plaintext', 'tls' or 'no-client-cert' (the server closed after our handshake)."""
    host, _, port = address.rpartition(":")
    try:
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout)
    except (OSError, ValueError):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # which CA signed it is not the question here
    ctx.set_alpn_protocols(["h2"])
    try:
        if cert is not None and key is not None:
            ctx.load_cert_chain(cert, key)
        tls = ctx.wrap_socket(raw, server_hostname=host.strip("[]"))
    except ssl.SSLError as exc:
        raw.close()
        return "plaintext" if "WRONG_VERSION_NUMBER" in str(exc) else None
    except OSError:  # no answer (a server still starting) or a reset: nothing to conclude
        raw.close()
        return None
    with tls:
        tls.settimeout(timeout)
        try:
            # A gRPC server opens with its HTTP/2 SETTINGS; under TLS 1.3 a server that
            # wanted a client certificate closes the connection after the handshake instead.
            return "tls" if tls.recv(1) else "no-client-cert"
        except OSError:
            return None


def explain_connect_failure(
    address: str,
    details: str,
    ca: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    timeout: float = 5.0,
) -> str | None:
    """What is wrong with this client's TLS set-up, or None when it looks like the network."""
    details = details or ""
    if ca is not None and any(s in details for s in _NOT_TLS):
        return f"coordinator {address} does not use TLS: drop --ca (or turn security.tls on)"
    if ca is not None and any(s in details for s in _UNTRUSTED):
        return (
            f"the certificate of coordinator {address} is not signed by the CA in {ca}: "
            "wrong --ca file (use the run's ca.pem)"
        )
    if ca is not None and any(s in details for s in _WRONG_NAME):
        return (
            f"the certificate of coordinator {address} does not name the host dialled: dial a "
            "name it lists, or reissue it with `lssfl certs --force --hosts ...`"
        )
    if not any(s in details for s in _CLOSED):
        return None
    seen = _probe(address, cert, key, timeout)
    if ca is None and seen in ("tls", "no-client-cert"):
        return f"coordinator {address} uses TLS: give --ca (the run's ca.pem)"
    if ca is not None and seen == "no-client-cert":
        if cert is None:
            return (
                f"coordinator {address} requires a client certificate (mutual TLS): "
                "give --cert and --key"
            )
        return (
            f"coordinator {address} refused the client certificate {cert}: it is not "
            "issued by the run's CA"
        )
    return None
