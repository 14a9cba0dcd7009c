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


def stream_window_options(window_bytes: int) -> list[tuple[str, int]]:
    """A small per-stream receive window, fixed (no bandwidth probing), for streams of many tiny messages.

    A receiver that falls behind then holds its sender's next write instead of queueing thousands of
    one-token messages; the sender's tokens meanwhile gather and go out as one message. 0: gRPC's default."""
    if window_bytes <= 0:
        return []
    return [("grpc.http2.lookahead_bytes", window_bytes), ("grpc.http2.bdp_probe", 0)]


def channel(address: str, tls: "Tls | None" = None, max_message_bytes: int = 16 * 1024 * 1024,
            stream_window_bytes: int = 0) -> grpc.aio.Channel:
    """A channel to another service: TLS (and our certificate, for mutual TLS) when ``tls`` has a CA."""
    credentials = tls.channel_credentials() if tls is not None else None
    options = channel_options(max_message_bytes) + stream_window_options(stream_window_bytes)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)
