"""TLS material and per-silo tokens.

``lssfl certs`` makes a demo CA, a coordinator certificate and, per silo, a client
certificate (CN = silo id) and a bearer token. The coordinator keeps only SHA-256 hashes of
the tokens (``tokens.json``); each silo keeps its own token file. Real deployments bring
their own PKI: only the file names below matter.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

CA_CERT = "ca.pem"
SERVER_CERT, SERVER_KEY = "coordinator.pem", "coordinator.key"
TOKENS = "tokens.json"
TOKEN_HEADER = "authorization"


def read_secret(path: Path, what: str) -> bytes:
    """The bytes of credential file ``path``; ValueError naming ``what`` when unreadable."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a client of the coordinator (None: plaintext).

    ``cert`` and ``key`` together make it mutual TLS; errors name the file at fault.
    """
    if ca is None:
        if cert is not None or key is not None:
            raise ValueError("--cert/--key need --ca (the coordinator's CA certificate)")
        return None
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together (mutual TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=read_secret(ca, "CA certificate"),
        private_key=read_secret(key, "client key") if key else None,
        certificate_chain=read_secret(cert, "client certificate") if cert else None,
    )


def silo_files(folder: Path, silo_id: str) -> tuple[Path, Path, Path]:
    """Certificate, key and token file of one silo."""
    return folder / f"{silo_id}.pem", folder / f"{silo_id}.key", folder / f"{silo_id}.token"


def hash_token(token: str) -> str:
    """The SHA-256 a token table stores instead of the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TokenTable:
    """silo id -> SHA-256 of its token."""

    hashes: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """The table in ``path`` (written by ``lssfl certs``)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read token table {path}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"token table {path} must map silo ids to SHA-256 hex strings")
        return cls(data)

    def silo_for(self, token: str) -> str | None:
        """The silo a bearer token belongs to, or None."""
        digest = hash_token(token)
        for silo, expected in self.hashes.items():
            if hmac.compare_digest(digest, expected):
                return silo
        return None


def make_certs(out: Path, silos: list[str], hosts: list[str], days: int = 365) -> None:
    """Write a CA, a coordinator certificate for ``hosts``, and per-silo certs and tokens."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(pem)
        os.chmod(path, 0o600)

    def issue(cn: str, key, issuer_key, issuer: x509.Name, ca: bool, extra) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for ext in extra:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("lssfl demo CA", ca_key, ca_key, name("lssfl demo CA"), True, [])
    (out / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue(
        hosts[0], server_key, ca_key, ca_cert.subject, False,
        [x509.SubjectAlternativeName(sans),
         x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])],
    )  # fmt: skip
    (out / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(out / SERVER_KEY, server_key)

    hashes_out = {}
    for silo in silos:
        cert_path, key_path, token_path = silo_files(out, silo)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(
            silo, key, ca_key, ca_cert.subject, False,
            [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
        )  # fmt: skip
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key_path, key)
        token = secrets.token_urlsafe(32)
        token_path.write_text(token + "\n")
        os.chmod(token_path, 0o600)
        hashes_out[silo] = hash_token(token)
    (out / TOKENS).write_text(json.dumps(hashes_out, indent=2) + "\n")
