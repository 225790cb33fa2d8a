"""One request's events, carried from the scheduler's thread onto the server's event loop.

The scheduler reports a request's progress by calling `on_event` on its own thread; the HTTP
handler awaits those events on the asyncio loop. `RequestStream` submits the request and puts
each event on an asyncio queue with `call_soon_threadsafe`, the one thread-safe way into a loop.
Closing a stream before its last event cancels the request, so that its pool pages come back
within one scheduler step: the client that asked for it has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nanokv.scheduler import Scheduler
from nanokv.sequence import Request, RequestEvent


class RequestStream:
    """Submits a request and yields its events in order, on the running event loop."""

    def __init__(self, scheduler: Scheduler, request: Request) -> None:
        """Submits at once, so that refusals (InputError, QueueFullError, ValueError) raise
        here, before any response has started."""
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestEvent] = asyncio.Queue()
        self.finished = False
        self.request_id = scheduler.submit(request, self._on_event)

    def _on_event(self, event: RequestEvent) -> None:
        """Runs on the scheduler's thread; must never raise there (it would stop the scheduler
        for every request), so a loop that has closed since (server shutdown) drops the event."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[RequestEvent]:
        """Every event of the request, the last one with its finish_reason."""
        while not self.finished:
            event = await self._queue.get()
            self.finished = event.finished
            yield event

    async def collect(self) -> tuple[str, RequestEvent]:
        """The whole text and the last event (finish reason, token counts)."""
        parts, last = [], None
        async for event in self.events():
            parts.append(event.text)
            last = event
        assert last is not None  # events() ends with the finishing event
        return "".join(parts), last

    def cancel(self) -> None:
        """Cancels the request unless it has finished; safe to call more than once."""
        if not self.finished:
            self._scheduler.cancel(self.request_id)
