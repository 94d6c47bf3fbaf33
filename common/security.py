"""TLS material and per-silo tokens.

``lssfl certs`` makes a demo CA, a coordinator certificate and, per silo, a client
certificate (CN = silo id) and a bearer token. The CA key stays in the folder (mode 0600)
so that ``lssfl certs add-silo`` can enrol a silo later without touching the others. The
coordinator keeps only SHA-256 hashes of the tokens (``tokens.json``); each silo keeps its
own token file. ``revoked.txt`` lists revoked silo ids; a running coordinator re-reads it
when it changes. Real deployments bring their own PKI: only the file names below matter.
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

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "coordinator.pem", "coordinator.key"
TOKENS = "tokens.json"
REVOKED = "revoked.txt"
TOKEN_HEADER = "authorization"
# The silo id a caller claims, sent with every call: the coordinator bounds each silo's calls
# before reading a request. With tokens on, it must be the token's silo.
SILO_HEADER = "lssfl-silo"


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


class RevokedFile:
    """The silo ids in ``revoked.txt``, re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._ids: frozenset[str] = frozenset()

    def __contains__(self, silo_id: str) -> bool:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        if (st.st_mtime_ns, st.st_size) != self._seen:
            self._ids = frozenset(read_revoked(self.path))
            self._seen = (st.st_mtime_ns, st.st_size)
        return silo_id in self._ids


def read_revoked(path: Path) -> list[str]:
    """The silo ids listed in ``path``, one a line, ``#`` comments skipped; [] when absent."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(cn: str, key, issuer_key, issuer, ca: bool, extra, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
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


def _pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, pem)


def make_certs(
    out: Path, silos: list[str], hosts: list[str], days: int = 365, force: bool = False
) -> None:
    """Write a CA (key kept, 0600), a coordinator certificate for ``hosts``, per-silo files.

    A folder that already holds a CA is refused unless ``force``: replacing the CA
    invalidates every silo's certificate and token.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if (out / CA_CERT).exists() and not force:
        raise ValueError(
            f"{out} already holds a CA ({CA_CERT}); replacing it invalidates every silo's "
            "files: `lssfl certs add-silo ID` enrols another silo, --force starts over"
        )
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("lssfl demo CA", ca_key, ca_key, _name("lssfl demo CA"), True, [], days)
    (out / CA_CERT).write_bytes(_pem(ca_cert))
    _write_key(out / CA_KEY, ca_key)

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        hosts[0], server_key, ca_key, ca_cert.subject, False,
        [x509.SubjectAlternativeName(sans),
         x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])], days,
    )  # fmt: skip
    (out / SERVER_CERT).write_bytes(_pem(server_cert))
    _write_key(out / SERVER_KEY, server_key)
    (out / TOKENS).write_text("{}\n")
    (out / REVOKED).unlink(missing_ok=True)
    for silo in silos:
        add_silo(out, silo, days=days, force=True)


def add_silo(out: Path, silo: str, days: int = 365, force: bool = False) -> None:
    """Issue one more silo's certificate, key and token with the folder's CA.

    The other silos' files and tokens stay valid. Existing files of ``silo`` are replaced
    only with ``force``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not silo or silo != silo.strip() or "/" in silo or silo.startswith("."):
        raise ValueError(f"silo id {silo!r} cannot name a file")
    cert_path, key_path, token_path = silo_files(out, silo)
    if not force and any(p.exists() for p in (cert_path, key_path, token_path)):
        raise ValueError(f"{cert_path} already exists; --force issues new files for {silo}")
    try:
        ca_cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise ValueError(
            f"{out} has no {Path(exc.filename).name}: make the CA first (`lssfl certs --out "
            f"{out} --silos ...`)"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out / CA_KEY} is not an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(
        silo, key, ca_key, ca_cert.subject, False,
        [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])], days,
    )  # fmt: skip
    cert_path.write_bytes(_pem(cert))
    _write_key(key_path, key)
    token = secrets.token_urlsafe(32)
    _write_private(token_path, (token + "\n").encode())
    table = TokenTable.load(out / TOKENS).hashes if (out / TOKENS).exists() else {}
    table[silo] = hash_token(token)
    _write_atomic(out / TOKENS, json.dumps(table, indent=2) + "\n")


def revoke_silo(out: Path, silo: str) -> None:
    """Refuse ``silo`` from now on: list it in revoked.txt and forget its token's hash."""
    if not (out / CA_CERT).exists():
        raise ValueError(f"{out} holds no CA ({CA_CERT}): is it the run's security.dir?")
    revoked = read_revoked(out / REVOKED)
    if silo not in revoked:
        _write_atomic(out / REVOKED, "".join(f"{s}\n" for s in [*revoked, silo]))
    if (out / TOKENS).exists():
        table = TokenTable.load(out / TOKENS).hashes
        if table.pop(silo, None) is not None:
            _write_atomic(out / TOKENS, json.dumps(table, indent=2) + "\n")
