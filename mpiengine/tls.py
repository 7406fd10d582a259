"""TLS for the client-controller socket, with a per-job certificate.

The controller makes a fresh self-signed certificate at start-up (an EC P-256
key, with the ``cryptography`` library) and writes its SHA-256 fingerprint into
the connection file. A client trusts exactly that certificate: no certificate
authority is involved, and a server presenting any other certificate is refused
before a byte of the mpiengine handshake is sent. The key and certificate never
touch the disk except inside a private temporary directory that is removed as
soon as they are loaded.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import tempfile
from typing import Tuple

from .errors import AuthenticationError

MODES = ("auto", "on", "off")


def wanted(mode: str, bound_ip: str) -> bool:
    """Decide whether to use TLS: ``auto`` means on unless bound to loopback."""
    if mode not in MODES:
        raise ValueError(f"--tls takes one of {', '.join(MODES)}; got {mode!r}")
    if mode != "auto":
        return mode == "on"
    try:
        return not ipaddress.ip_address(bound_ip).is_loopback
    except ValueError:
        return True


def make_certificate(hostname: str) -> Tuple[bytes, bytes, str]:
    """Return (certificate PEM, private key PEM, SHA-256 fingerprint hex)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mpiengine {hostname}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    der = cert.public_bytes(serialization.Encoding.DER)
    return cert_pem, key_pem, hashlib.sha256(der).hexdigest()


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="mpiengine-tls-") as d:  # mode 0700
        path = os.path.join(d, "controller.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + cert_pem)
        ctx.load_cert_chain(path)
    return ctx


def client_context() -> ssl.SSLContext:
    # The certificate is pinned by fingerprint (check_fingerprint), not by a CA.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_fingerprint(sock: ssl.SSLSocket, expected: str, where: str) -> None:
    der = sock.getpeercert(binary_form=True) or b""
    if not hmac.compare_digest(hashlib.sha256(der).hexdigest(), expected.lower()):
        raise AuthenticationError(
            f"the controller at {where} presented a certificate that does not match the "
            f"connection file: refusing to talk to it (another server on that port?)")


def wrap_client(sock: socket.socket, fingerprint: str, where: str) -> ssl.SSLSocket:
    tls = client_context().wrap_socket(sock)
    try:
        check_fingerprint(tls, fingerprint, where)
    except AuthenticationError:
        tls.close()
        raise
    return tls


#: How much one batch of TLS reads may bring before the reader hands it on.
READ_BATCH = 8 << 20


def read_more(sock: ssl.SSLSocket, view: memoryview, got: int, limit: int = READ_BATCH) -> int:
    """Keep reading into ``view`` after a read that brought ``got`` bytes; return the total.

    A TLS socket hands over one record (at most 16 KiB) per ``recv``, so a large
    part would otherwise cost a poll, a parse step and a MAC call per 16 KiB. This
    reads on while the socket has bytes and ``view`` has room, up to ``limit``.
    An SSL error other than "nothing to read now" is raised to the caller; an end
    of stream stops the batch (the next read reports it).
    """
    while got < len(view) and got < limit:
        try:
            n = sock.recv_into(view[got:])
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            break
        if not n:
            break
        got += n
    return got
