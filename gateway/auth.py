"""API keys to tenants. With no keys configured the gateway is open and the request names its tenant."""

from __future__ import annotations

from typing import Mapping, Sequence


class AuthError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code            # "unauthenticated" or "permission_denied"


def authenticate(metadata: Sequence[tuple[str, str | bytes]], api_keys: Mapping[str, str], requested_tenant: str
                 ) -> str:
    """The tenant this call acts for; raises AuthError when the key is missing, unknown or for another tenant."""
    if not api_keys:
        return requested_tenant or "default"
    key = ""
    for name, value in metadata:
        value = value.decode() if isinstance(value, bytes) else value
        if name == "authorization" and value.lower().startswith("bearer "):
            key = value[7:].strip()
        elif name == "x-api-key":
            key = value.strip()
    if not key:
        raise AuthError("unauthenticated", "missing API key (metadata 'authorization: Bearer KEY' or 'x-api-key')")
    tenant = api_keys.get(key)
    if tenant is None:
        raise AuthError("unauthenticated", "unknown API key")
    if requested_tenant and requested_tenant != tenant:
        raise AuthError("permission_denied", f"this key may not act for tenant {requested_tenant!r}")
    return tenant
