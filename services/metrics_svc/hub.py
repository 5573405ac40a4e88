"""In-process fan-out of freshly persisted events to live watchers, on the server's event loop.

One producer per job: the append that persisted the events publishes them once, and every
watcher of the job takes them from its own bounded buffer; no watcher reads the database for live
events. Publishing never blocks: a watcher whose buffer would overflow is marked and cut off (it
resumes from its last seq), so a slow watcher never slows the relay, training or other watchers.
Everything here runs on the loop thread (appends publish through ``loop.call_soon_threadsafe``),
so there are no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence

from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2


class Published:
    """A persisted event as every watcher of its job receives it, serialized once for all of them
    (the watch stream sends `wire` as is) rather than once per watcher."""

    __slots__ = ("event", "wire")

    def __init__(self, event: common_pb2.JobEvent) -> None:
        self.event = event
        self.wire = metrics_pb2.WatchJobEventsResponse(event=event).SerializeToString()


class Subscription:
    """A watcher's buffer of events of one job."""

    def __init__(self, job: str, capacity: int) -> None:
        self.job = job
        self._capacity = capacity
        self._events: deque[Published] = deque()
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False  # the service is stopping: the watcher reconnects elsewhere

    def push(self, events: Sequence[Published]) -> None:
        if len(self._events) + len(events) > self._capacity:
            self.overflowed = True
            self._events.clear()
        else:
            self._events.extend(events)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def take(self, timeout: float) -> list[Published]:
        """Waits up to `timeout` for events and returns all buffered ones (maybe none)."""
        if not self._events and not self.overflowed and not self.closed:
            # asyncio.timeout, not wait_for: no task is created per wait (one per event per watcher).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
        self._ready.clear()
        items = list(self._events)
        self._events.clear()
        return items


class EventHub:
    """Subscriptions by job."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._subs: dict[str, set[Subscription]] = {}
        self.published: dict[str, int] = {}  # the highest seq published per watched job

    def watched(self, job: str) -> bool:
        return job in self._subs

    def counts(self) -> tuple[int, int]:
        """(open watches, jobs they watch)."""
        return sum(len(subs) for subs in list(self._subs.values())), len(self._subs)

    def subscribe(self, job: str) -> Subscription:
        sub = Subscription(job, self._capacity)
        self._subs.setdefault(job, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.job]
                self.published.pop(sub.job, None)

    def publish(self, job: str, events: Sequence[common_pb2.JobEvent]) -> None:
        subs = list(self._subs.get(job, ())) if events else []
        if subs:
            self.published[job] = max(self.published.get(job, 0), events[-1].seq)
            published = [Published(e) for e in events]
            for sub in subs:
                sub.push(published)

    def close_all(self) -> None:
        """Ends every watch (the service is stopping): each is told to reconnect."""
        for subs in self._subs.values():
            for sub in subs:
                sub.close()
