"""Transport security: the server's TLS credentials from the ``tls`` settings (see
:class:`server.settings.TlsSettings`).

No TLS settings: a plaintext port (loopback development, or TLS ended by a proxy in front). Certificate
and key: TLS only, a plaintext client cannot connect. A client CA too: mutual TLS, a client without a
certificate that chains to that CA is refused during the handshake (the call never reaches the server's
code). The files are read once, at start; a file that cannot be read stops the server with its path.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from server.settings import TlsSettings


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from None


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """The server credentials, or None for a plaintext port."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    pair = (_read(tls.key_file, "key"), _read(tls.cert_file, "certificate"))
    ca = _read(tls.client_ca_file, "client CA") if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def describe(tls: TlsSettings) -> str:
    """For the start-up log line."""
    if tls.cert_file is None:
        return "plaintext (no TLS)"
    if tls.client_ca_file is None:
        return f"TLS ({tls.cert_file})"
    return f"mutual TLS ({tls.cert_file}; client certificates from {tls.client_ca_file} required)"
