"""Client-side helpers: channels and the generated stubs under short names."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from services.proto.tandem.v1 import (  # noqa: F401  (re-exported)
    balancer_pb2, balancer_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, profiler_pb2,
    profiler_pb2_grpc, worker_pb2, worker_pb2_grpc)
from services.server import channel_options

if TYPE_CHECKING:
    from services.tls import Tls


def channel(address: str, tls: "Tls | None" = None, max_message_bytes: int = 16 * 1024 * 1024) -> grpc.aio.Channel:
    """A channel to another service: TLS (and our certificate, for mutual TLS) when ``tls`` has a CA."""
    credentials = tls.channel_credentials() if tls is not None else None
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes))
    return grpc.aio.secure_channel(address, credentials, options=channel_options(max_message_bytes))
