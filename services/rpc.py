"""Client-side helpers: traced channels and the generated stubs under short names."""

from __future__ import annotations

import grpc

from services.proto.tandem.v1 import (  # noqa: F401  (re-exported)
    balancer_pb2, balancer_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, profiler_pb2,
    profiler_pb2_grpc, worker_pb2, worker_pb2_grpc)
from services.server import channel_options
from services.telemetry import Telemetry


def channel(address: str, telemetry: Telemetry | None = None,
            max_message_bytes: int = 16 * 1024 * 1024) -> grpc.aio.Channel:
    interceptors = telemetry.client_interceptors() if telemetry is not None else None
    return grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes),
                                     interceptors=interceptors)
