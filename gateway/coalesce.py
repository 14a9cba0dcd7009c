"""Coalescing a stream: what arrived while the consumer was busy comes as one batch.

The gateway relays each worker's stream to its client. Written one message per token, a client or a hop that
falls behind makes the relay fall behind too: messages queue in gRPC, each still paid for. Read in a task of its
own, everything that arrived during the previous write goes out as one message, so the relay keeps up at the
cost of coarser chunks exactly when it could not keep up anyway (DESIGN.md, the request's way, step 3). A
stream that keeps up sees one batch per item.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterable, AsyncIterator, TypeVar

T = TypeVar("T")


async def coalesced(stream: AsyncIterable[T]) -> AsyncIterator[list[T]]:
    """The items of ``stream``, in order, batched by what was waiting when the consumer came back for more; the
    stream's error is raised after the items before it. Closing the generator stops the reading."""
    pending: list[T] = []
    ready = asyncio.Event()
    done = False
    error: BaseException | None = None

    async def read() -> None:
        nonlocal done, error
        try:
            async for item in stream:
                pending.append(item)
                ready.set()
        except Exception as e:
            error = e
        finally:
            done = True
            ready.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await ready.wait()
            if pending:
                batch = pending[:]
                pending.clear()
                if not done:
                    ready.clear()
                yield batch
            elif done:
                if error is not None:
                    raise error
                return
    finally:
        reader.cancel()
