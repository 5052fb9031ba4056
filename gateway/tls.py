"""TLS for the gateway: mTLS server credentials that reload on SIGHUP, and dev certificates.

Production servers require a client certificate signed by ``server.tls.client_ca_file``
(``require_client_authentication=True``). gRPC's TLS stack negotiates TLS 1.2 or 1.3
only: grpc-core's default minimum is TLS 1.2 and Python's grpc exposes no way to
lower it (``tests/security/test_tls.py`` checks that a TLS 1.1 client is refused).

Reloading: :class:`ServerCredentials` reads and checks the files once at start and
again on :meth:`ServerCredentials.reload` (SIGHUP). gRPC asks the credentials for a
configuration before every new handshake; a reload therefore affects new
connections only and never drops a connection or a request in flight. Files that
fail the checks (missing, unreadable, key not matching the certificate, key
readable by others, a certificate of the server's chain that has expired or is not valid yet,
a server certificate with an extension that cannot be parsed) are
refused and the current material stays in use; at start-up they stop the gateway.
A ``not_valid_before`` up to :data:`NOT_BEFORE_SKEW` ahead of this host's clock is
accepted: a certificate issued a moment ago on a host whose clock runs a little
ahead is valid. A client CA certificate outside its validity is logged (every client
whose certificate it signed fails the handshake) but not refused: a bundle may hold
an old CA next to the current one.

What is logged: at start and on every reload, the served certificate (fingerprint,
DNS and IP SANs, not-after) and the client CA certificates (subject, fingerprint,
not-after) with the bundle's SHA-256, and on a reload how the client CAs changed and
which names the new server certificate no longer holds (WARNING). Every reload is also an
audit event, ``tls.reload`` (:meth:`ServerCredentials.reload`). Expiry:
:meth:`ServerCredentials.check_expiry`, every :data:`EXPIRY_CHECK_INTERVAL`, logs a
served certificate within :data:`EXPIRY_WARNING` of its expiry (WARNING) or past it
(ERROR), each time; a client CA certificate within :data:`EXPIRY_WARNING` of its expiry (WARNING),
each time; one that expired since it was loaded (WARNING), once, as a bundle may keep an old CA
next to the current one; and a client CA file with no certificate valid (ERROR), each time, as
every client then fails the handshake.
:class:`TlsMaterial` carries the not-after times that ``/metrics`` and CloudWatch publish.

Errors are :class:`gateway.config.ConfigError` naming the key path
(``server.tls.key_file: …``); they never quote file contents.

Development certificates (``hsmgw dev certs``) come from :func:`write_dev_certs`:
a local CA, a server certificate for 127.0.0.1/::1/localhost, and client
certificates whose identity is the SAN URI ``spiffe://hsmgw/<name>`` (and CN).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.auth import audit
from gateway.config import ConfigError, TlsConfig

log = logging.getLogger(__name__)

SPIFFE_TRUST_DOMAIN = "hsmgw"
DEV_SERVER_HOSTS = ("127.0.0.1", "::1", "localhost")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NOT_BEFORE_SKEW = datetime.timedelta(minutes=5)
"""How far a certificate's ``not_valid_before`` may be ahead of this host's clock."""
_SKEW_MINUTES = f"{NOT_BEFORE_SKEW.total_seconds() / 60:g}"
EXPIRY_WARNING = datetime.timedelta(days=14)
"""How long before a certificate's ``not_valid_after`` the gateway starts warning about it."""
EXPIRY_CHECK_INTERVAL = 3600.0
"""Seconds between the checks of the served certificates' expiry (:meth:`ServerCredentials.check_expiry`)."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# -- loading and reloading ---------------------------------------------------------


@dataclass(frozen=True)
class CertificateInfo:
    """What may be logged and published of one certificate."""

    subject: str
    """RFC 4514."""
    fingerprint: str
    """SHA-256 of the certificate (DER), hex."""
    not_before: datetime.datetime
    not_after: datetime.datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertificateInfo:
        return cls(cert.subject.rfc4514_string(), cert.fingerprint(hashes.SHA256()).hex(),
                   cert.not_valid_before_utc, cert.not_valid_after_utc)

    def __str__(self) -> str:
        return f"{self.subject!r} ({self.fingerprint[:16]}, until {self.not_after.isoformat()})"


@dataclass(frozen=True)
class TlsMaterial:
    """The checked contents of the three TLS files."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes = field(repr=False)
    fingerprint: str
    """SHA-256 of the server's leaf certificate (DER), hex: safe to log."""
    not_after: datetime.datetime
    not_before: datetime.datetime
    """The latest ``not_valid_before`` of the chain served (leaf and intermediates)."""
    names: tuple[str, ...]
    """The server certificate's DNS and IP address SANs: the names clients may connect by."""
    chain: tuple[CertificateInfo, ...]
    """The certificates served, leaf first."""
    client_cas: tuple[CertificateInfo, ...]
    """The certificates of ``client_ca_file``, in its order."""
    client_ca_digest: str
    """SHA-256 of ``client_ca_file``'s contents, hex."""


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"server.tls.{key}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"server.tls.{key}: cannot read {path}: {exc.strerror}") from None


def _certificates(data: bytes, path: Path, key: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"server.tls.{key}: {path} holds no PEM certificate")
    return certs


def load_material(tls: TlsConfig, *, now: datetime.datetime | None = None) -> TlsMaterial:
    """Read and check the certificate, its key and the client CA, at ``now`` (default: the clock)."""
    chain = _read(tls.cert_file, "cert_file")
    leaf, *intermediates = _certificates(chain, tls.cert_file, "cert_file")
    try:
        mode = tls.key_file.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"server.tls.key_file: {tls.key_file} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"server.tls.key_file: {tls.key_file} is open to its group or others; run: chmod 600 "
                          f"{tls.key_file}")
    key_pem = _read(tls.key_file, "key_file")
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # The parser's message is never shown: say only which file.
        raise ConfigError(f"server.tls.key_file: {tls.key_file} is not an unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private_key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ConfigError(
            f"server.tls.key_file: {tls.key_file} is not the key of the certificate in {tls.cert_file}"
        )
    client_ca = _read(tls.client_ca_file, "client_ca_file")
    # Each CA once: bundles put together by hand may hold one twice.
    cas = list({ca.fingerprint(hashes.SHA256()): ca for ca in _certificates(client_ca, tls.client_ca_file,
                                                                           "client_ca_file")}.values())
    now = now or _utcnow()
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex()
    # A certificate of the chain outside its validity fails every client's verification: refuse
    # it, as any bad file.
    for number, cert in enumerate([leaf, *intermediates]):
        which = (f"the certificate in {tls.cert_file} ({fingerprint[:16]})" if number == 0 else
                 f"intermediate certificate {cert.subject.rfc4514_string()!r} in {tls.cert_file}")
        problem = _outside_validity(cert, now)
        if problem is not None:
            clock = (f", and this host's clock says {now.isoformat(timespec='seconds')} ({_SKEW_MINUTES} minutes "
                     "of clock skew are allowed)" if problem.startswith("is not") else "")
            raise ConfigError(f"server.tls.cert_file: {which} {problem}{clock}")
        if _expires_soon(cert, now):
            log.warning("server.tls.cert_file: %s expires at %s", which, cert.not_valid_after_utc.isoformat())
    try:
        names = _names(leaf)
    except ValueError as exc:  # cryptography parses extensions on first use, and refuses malformed DER
        raise ConfigError(f"server.tls.cert_file: the certificate in {tls.cert_file} ({fingerprint[:16]}) has an "
                          f"extension that cannot be parsed ({exc})") from None
    _check_client_cas(cas, tls.client_ca_file, now)
    return TlsMaterial(
        cert_chain=chain,
        private_key=key_pem,
        client_ca=client_ca,
        fingerprint=fingerprint,
        not_after=leaf.not_valid_after_utc,
        not_before=max(cert.not_valid_before_utc for cert in [leaf, *intermediates]),
        names=names,
        chain=tuple(CertificateInfo.of(cert) for cert in [leaf, *intermediates]),
        client_cas=tuple(CertificateInfo.of(ca) for ca in cas),
        client_ca_digest=hashlib.sha256(client_ca).hexdigest(),
    )


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS and IP address SANs of ``cert``, as clients would write them."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(san.value) for san in sans if isinstance(san, (x509.DNSName, x509.IPAddress)))


def _outside_validity(cert: x509.Certificate | CertificateInfo, now: datetime.datetime) -> str | None:
    """How ``cert`` is outside its validity at ``now`` ("expired at …", "is not valid before …"), or None."""
    if isinstance(cert, x509.Certificate):
        cert = CertificateInfo.of(cert)
    if cert.not_after <= now:
        return f"expired at {cert.not_after.isoformat()}"
    if cert.not_before > now + NOT_BEFORE_SKEW:
        return f"is not valid before {cert.not_before.isoformat()}"
    return None


def _expires_soon(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_after_utc - now < EXPIRY_WARNING


def _check_client_cas(cas: list[x509.Certificate], path: Path, now: datetime.datetime) -> None:
    """Log client CA certificates outside their validity: clients they signed fail verification."""
    problems = []
    for ca in cas:
        name = ca.subject.rfc4514_string()
        problem = _outside_validity(ca, now)
        if problem is not None:
            problems.append(f"{name!r} {problem}")
        elif _expires_soon(ca, now):
            log.warning("server.tls.client_ca_file: CA certificate %r in %s expires at %s", name, path,
                        ca.not_valid_after_utc.isoformat())
    if len(problems) == len(cas):
        log.error("server.tls.client_ca_file: no certificate in %s is valid now (%s): every client fails the "
                  "handshake until the file is replaced", path, "; ".join(problems))
    else:
        for problem in problems:
            log.warning("server.tls.client_ca_file: CA certificate %s in %s: client certificates it signed fail "
                        "the handshake", problem, path)


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.cert_chain)], root_certificates=material.client_ca
    )


class ServerCredentials:
    """mTLS server credentials whose certificate, key and client CA reload on demand."""

    def __init__(self, tls: TlsConfig, *, clock: Callable[[], datetime.datetime] = _utcnow) -> None:
        self._tls = tls
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self.material = load_material(tls, now=now)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._expired_cas = _expired(self.material.client_cas, now)
        """Client CA certificates whose expiry was logged already (``load_material`` logs those at load)."""
        log.info("TLS: %s; %s", self._served(self.material, now), self._client_cas(self.material))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self.material), self._fetch, require_client_authentication=True
        )

    def reload(self) -> bool:
        """Re-read the files; new handshakes use them. False (and a log line) if they are bad.

        Either way the audit event ``tls.reload`` records it: the files that changed and what
        this process now serves and trusts, or why the files were refused and what it still
        serves. Each process of the gateway reloads, and records, on its own: the event names it
        (``pid``). Not ``required``: the files are in use whether or not the audit log takes it.
        """
        now = self._clock()
        try:
            material = load_material(self._tls, now=now)
        except ConfigError as exc:
            log.error("TLS reload refused, still serving certificate %s: %s", self.material.fingerprint[:16], exc)
            audit("tls.reload", ok=False, pid=os.getpid(), error=str(exc), cert_sha256=self.material.fingerprint)
            return False
        with self._lock:
            previous, self.material = self.material, material
            self._pending = _configuration(material)
            self._expired_cas = _expired(material.client_cas, now)
        files = ((self._tls.cert_file, previous.cert_chain, material.cert_chain),
                 (self._tls.key_file, previous.private_key, material.private_key),
                 (self._tls.client_ca_file, previous.client_ca, material.client_ca))
        leaf = material.chain[0]
        audit("tls.reload", ok=True, pid=os.getpid(), changed=[str(path) for path, old, new in files if old != new],
              cert_subject=leaf.subject, cert_sha256=leaf.fingerprint, cert_not_after=leaf.not_after.isoformat(),
              client_ca_sha256=material.client_ca_digest, client_cas=[ca.fingerprint for ca in material.client_cas])
        dropped = [name for name in previous.names if name not in material.names]
        if dropped:
            log.warning("TLS reload: the new server certificate %s does not name %s, which the previous one (%s) "
                        "did: clients that connect by %s fail the handshake (hostname verification)",
                        material.fingerprint[:16], ", ".join(dropped), previous.fingerprint[:16],
                        "that name" if len(dropped) == 1 else "those names")
        log.info("TLS reloaded: %s; %s", self._served(material, now), self._client_cas(material, previous))
        return True

    def check_expiry(self) -> None:
        """Log the served certificates that have expired (ERROR) or expire within :data:`EXPIRY_WARNING`
        (WARNING), each time; the client CA certificates that expire within :data:`EXPIRY_WARNING`
        (WARNING), each time; one that expired since it was loaded (WARNING), once; and a client CA
        file none of whose certificates is valid (ERROR), each time.

        Run at every :data:`EXPIRY_CHECK_INTERVAL` (``load_material`` does the same at load): a
        certificate that expires while the gateway runs fails every client's handshake, and the
        clients' errors never reach the gateway's log.
        """
        now = self._clock()
        material = self.material
        for number, cert in enumerate(material.chain):
            which = (f"the server certificate {cert.fingerprint[:16]} (from {self._tls.cert_file})" if number == 0
                     else f"intermediate certificate {cert.subject!r} (from {self._tls.cert_file})")
            if cert.not_after <= now:
                log.error("server.tls.cert_file: %s expired at %s and is still served: every client fails the "
                          "handshake (CERTIFICATE_VERIFY_FAILED) until a new certificate is in place and the "
                          "gateway reloads it (SIGHUP)", which, cert.not_after.isoformat())
            elif cert.not_after - now < EXPIRY_WARNING:
                log.warning("server.tls.cert_file: %s expires at %s, in %s: put a new certificate in place and "
                            "send SIGHUP", which, cert.not_after.isoformat(), _span(cert.not_after - now))
        cas = material.client_cas
        outside = [ca for ca in cas if _outside_validity(ca, now)]
        if len(outside) == len(cas):
            log.error("server.tls.client_ca_file: no certificate in %s is valid now (%s): every client fails the "
                      "handshake until the file is replaced and reloaded (SIGHUP)", self._tls.client_ca_file,
                      "; ".join(f"{ca.subject!r} {_outside_validity(ca, now)}" for ca in cas))
            return
        newly: set[str] = set()
        with self._lock:  # reload() replaces material and _expired_cas together
            if self.material is material:  # else reloaded since: the reload logged the new file's CAs
                newly = {ca.fingerprint for ca in outside} - self._expired_cas
                self._expired_cas.update(newly)
        for ca in cas:
            if ca in outside:
                if ca.fingerprint in newly:
                    log.warning("server.tls.client_ca_file: CA certificate %r in %s %s: client certificates it "
                                "signed fail the handshake", ca.subject, self._tls.client_ca_file,
                                _outside_validity(ca, now))
            elif ca.not_after - now < EXPIRY_WARNING:
                log.warning("server.tls.client_ca_file: CA certificate %r in %s expires at %s, in %s",
                            ca.subject, self._tls.client_ca_file, ca.not_after.isoformat(), _span(ca.not_after - now))

    def _served(self, material: TlsMaterial, now: datetime.datetime) -> str:
        names = ", ".join(material.names) or "no DNS or IP name"
        text = (f"server certificate {material.fingerprint[:16]} for {names}, valid until "
                f"{material.not_after.isoformat()}")
        if material.not_before > now:
            # Taken within the clock skew allowed: clients whose clocks are not ahead of its
            # not-before fail the handshake until then ("certificate is not yet valid").
            text += (f", and valid only from {material.not_before.isoformat()}, "
                     f"{_span(material.not_before - now)} from now by this host's clock (up to {_SKEW_MINUTES} "
                     "minutes of clock skew are allowed): until then clients may fail the handshake")
        return text

    def _client_cas(self, material: TlsMaterial, previous: TlsMaterial | None = None) -> str:
        cas = ", ".join(str(ca) for ca in material.client_cas)
        text = f"client CAs from {self._tls.client_ca_file} (sha256 {material.client_ca_digest[:16]}): {cas}"
        if previous is None:
            return text
        if previous.client_ca_digest == material.client_ca_digest:
            return text + "; client CAs unchanged"
        before = {ca.fingerprint for ca in previous.client_cas}
        after = {ca.fingerprint for ca in material.client_cas}
        added = [str(ca) for ca in material.client_cas if ca.fingerprint not in before]
        removed = [str(ca) for ca in previous.client_cas if ca.fingerprint not in after]
        changes = [f"added {', '.join(added)}"] if added else []
        changes += [f"removed {', '.join(removed)}"] if removed else []
        return text + (f"; client CAs changed (sha256 {previous.client_ca_digest[:16]} before): "
                       f"{'; '.join(changes) or 'the same certificates, in another order or form'}")

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before every handshake, on its own thread: no I/O here.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def _expired(cas: Sequence[CertificateInfo], now: datetime.datetime) -> set[str]:
    return {ca.fingerprint for ca in cas if _outside_validity(ca, now)}


def _span(delta: datetime.timedelta) -> str:
    """``3 days``, ``5 hours``, ``12 minutes``, ``40 seconds``: roughly how long ``delta`` is."""
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


# -- development certificates ------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def spiffe_id(name: str) -> str:
    return f"spiffe://{SPIFFE_TRUST_DOMAIN}/{name}"


def check_client_name(name: str) -> str:
    if not _CLIENT_NAME.fullmatch(name):
        raise ValueError(
            f"client name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmgw dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def new_ca(common_name: str = "hsmgw dev CA", *, days: int = 3650) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def _leaf(
    issuer: Issuer, common_name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier, days: int
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), issuer.certificate.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The subject alternative names for a server reachable at ``hosts``: an IP address entry for
    each host that is one, a DNS name entry for each other."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def issue_server(issuer: Issuer, hosts: Sequence[str] = DEV_SERVER_HOSTS, *, days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for a server reachable at ``hosts`` (IPs or DNS names)."""
    return _leaf(issuer, hosts[0] if hosts else "hsmgw", subject_alt_names(hosts), ExtendedKeyUsageOID.SERVER_AUTH,
                 days)


def issue_client(issuer: Issuer, name: str, *, uri: bool = True, days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for client ``name``: CN = name, SAN URI spiffe://hsmgw/name."""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(name))] if uri else []
    return _leaf(issuer, name, sans, ExtendedKeyUsageOID.CLIENT_AUTH, days)


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically (a reload never sees half a file); private files are 0600 from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600 if private else 0o644)
    os.replace(tmp, path)


def load_issuer(cert_path: Path, key_path: Path) -> Issuer:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: expected an EC private key")
    return Issuer(cert, key)


@dataclass(frozen=True)
class DevCerts:
    out: Path
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]
    """name → (certificate, key)."""
    created: tuple[str, ...]

    def client(self, name: str) -> tuple[Path, Path]:
        return self.clients[name]


def write_dev_certs(
    out: Path, clients: Sequence[str] = (), *, hosts: Sequence[str] = DEV_SERVER_HOSTS, days: int = 365
) -> DevCerts:
    """Make (or reuse) a local CA, a server certificate and client certificates in ``out``.

    Idempotent: existing files are kept, so new clients join the same CA. Keys are 0600.
    """
    for name in clients:
        check_client_name(name)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    created: list[str] = []
    ca, ca_key = out / "ca.pem", out / "ca-key.pem"
    if ca.exists() != ca_key.exists():
        raise ValueError(f"{out}: found only one of ca.pem and ca-key.pem; remove it to make a new CA")
    if ca.exists():
        issuer = load_issuer(ca, ca_key)
    else:
        issuer = new_ca(days=max(days, 3650))
        write_file(ca_key, _key_pem(issuer.key), private=True)
        write_file(ca, issuer.certificate.public_bytes(serialization.Encoding.PEM))
        created += [str(ca), str(ca_key)]
    server, server_key = out / "server.pem", out / "server-key.pem"
    if not (server.exists() and server_key.exists()):
        cert_pem, key_pem = issue_server(issuer, hosts, days=days)
        write_file(server_key, key_pem, private=True)
        write_file(server, cert_pem)
        created += [str(server), str(server_key)]
    paths: dict[str, tuple[Path, Path]] = {}
    for name in clients:
        cert_path, key_path = out / f"client-{name}.pem", out / f"client-{name}-key.pem"
        if not (cert_path.exists() and key_path.exists()):
            cert_pem, key_pem = issue_client(issuer, name, days=days)
            write_file(key_path, key_pem, private=True)
            write_file(cert_path, cert_pem)
            created += [str(cert_path), str(key_path)]
        paths[name] = (cert_path, key_path)
    return DevCerts(out, ca, ca_key, server, server_key, paths, tuple(created))
