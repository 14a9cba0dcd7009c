"""Client-side helpers: channels and the generated stubs under short names."""

from __future__ import annotations

import grpc

from services.proto.tandem.v1 import (  # noqa: F401  (re-exported)
    balancer_pb2, balancer_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, profiler_pb2,
    profiler_pb2_grpc, worker_pb2, worker_pb2_grpc)
from services.server import channel_options


def channel(address: str, max_message_bytes: int = 16 * 1024 * 1024) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes))
