"""Transport security from the settings ``tls_cert``, ``tls_key``, ``tls_ca`` and ``tls_client_auth``.

With a certificate and key a service serves TLS; with a CA as well it verifies the services it calls and, with
``tls_client_auth`` (the default for internal services, not for the public gateway), requires callers to present
a certificate that CA signed: mutual TLS. A service presents its own certificate when it calls another, so one
certificate per service covers both directions. Everything is gRPC's own credentials; no setting, no TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsError(ValueError):
    """A TLS setting that cannot work, named."""


def _read(setting: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"{setting}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"{setting}: {path} is not PEM")
    return data


@dataclass(frozen=True)
class Tls:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    client_auth: bool = True

    @classmethod
    def from_paths(cls, cert: str = "", key: str = "", ca: str = "", client_auth: bool = True) -> "Tls | None":
        """None when nothing is set (plaintext); raises TlsError for a half-set or unreadable configuration."""
        if not (cert or key or ca):
            return None
        if bool(cert) != bool(key):
            raise TlsError("tls_cert and tls_key go together: set both or neither")
        return cls(_read("tls_cert", cert), _read("tls_key", key), _read("tls_ca", ca), client_auth)

    @classmethod
    def from_settings(cls, settings: object) -> "Tls | None":
        return cls.from_paths(getattr(settings, "tls_cert", ""), getattr(settings, "tls_key", ""),
                              getattr(settings, "tls_ca", ""), getattr(settings, "tls_client_auth", True))

    @property
    def mutual(self) -> bool:
        return self.ca is not None and self.client_auth

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """What this service serves with; None without a certificate (a CA alone only verifies peers)."""
        if self.cert is None or self.key is None:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """What this service calls others with: verify them by the CA, present our certificate."""
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)
