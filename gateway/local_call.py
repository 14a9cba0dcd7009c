"""A Generate call made inside the gateway's process, for fronts other than gRPC (the OpenAI HTTP API).

``GatewayServicer.Generate`` talks to its caller through five methods of gRPC's ``ServicerContext``:
``invocation_metadata``, ``time_remaining``, ``set_trailing_metadata``, ``write`` and ``abort``. ``LocalCall``
implements exactly those, so an HTTP request takes the same path as a gRPC one (validation, auth, prediction,
routing, retries, relay) and no decision is made twice. Replies are read by iterating the call; the status a
gRPC client would see ends the iteration as ``CallFailed``. Dropping the call (``cancel``) cancels the request
as a dropped gRPC stream does: the worker call is cancelled and the binding released.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from services.rpc import gateway_pb2

Handler = Callable[[gateway_pb2.GenerateRequest, "LocalCall"], Awaitable[None]]


class CallFailed(Exception):
    """The call ended with a status other than OK, as a gRPC client would have seen it."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = dict(trailing)

    @property
    def retry_after_ms(self) -> int | None:
        value = self.trailing.get("retry-after-ms")
        return int(value) if value and value.isdigit() else None


class LocalCall:
    """One in-process call: the servicer writes replies into it, the front reads them out."""

    def __init__(self, metadata: Sequence[tuple[str, str]] = (), timeout_s: float | None = None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._trailing: tuple[tuple[str, str], ...] = ()
        self._replies: asyncio.Queue[gateway_pb2.GenerateResponse | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    # ----- the ServicerContext subset the servicer uses --------------------------------------------------
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._trailing = tuple(metadata)

    async def write(self, reply: gateway_pb2.GenerateResponse) -> None:
        self._replies.put_nowait(reply)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise CallFailed(code, details, self._trailing)

    # ----- the front's side --------------------------------------------------------------------------------
    def start(self, handler: Handler, request: gateway_pb2.GenerateRequest) -> "LocalCall":
        async def run() -> None:
            try:
                await handler(request, self)
            finally:
                self._replies.put_nowait(None)

        self._task = asyncio.ensure_future(run())
        return self

    async def __aiter__(self) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        assert self._task is not None, "start() the call first"
        while (reply := await self._replies.get()) is not None:
            yield reply
        await self._task            # raises CallFailed (or a bug's exception) once the replies are out

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
