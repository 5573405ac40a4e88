"""In-process fan-out of freshly persisted events to live watchers.

Each watcher owns a bounded buffer. Publishing never blocks: a watcher whose buffer would
overflow is marked and cut off (it resumes from its last seq), so a slow watcher never slows the
relay, training or other watchers.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Sequence

from segtrain.common.v1 import common_pb2


class Subscription:
    """A watcher's buffer of events of one job."""

    def __init__(self, job: str, capacity: int) -> None:
        self.job = job
        self._capacity = capacity
        self._events: deque[common_pb2.JobEvent] = deque()
        self._cond = threading.Condition()
        self.overflowed = False
        self.closed = False

    def push(self, events: Sequence[common_pb2.JobEvent]) -> None:
        with self._cond:
            if len(self._events) + len(events) > self._capacity:
                self.overflowed = True
                self._events.clear()
            else:
                self._events.extend(events)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def take(self, timeout: float) -> list[common_pb2.JobEvent]:
        """Waits up to `timeout` for events and returns all buffered ones (maybe none)."""
        with self._cond:
            if not self._events and not self.overflowed and not self.closed:
                self._cond.wait(timeout)
            items = list(self._events)
            self._events.clear()
            return items


class EventHub:
    """Subscriptions by job."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._lock = threading.Lock()

    def subscribe(self, job: str) -> Subscription:
        sub = Subscription(job, self._capacity)
        with self._lock:
            self._subs[job].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.job)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.job]

    def publish(self, job: str, events: Sequence[common_pb2.JobEvent]) -> None:
        if not events:
            return
        with self._lock:
            subs = list(self._subs.get(job, ()))
        for sub in subs:
            sub.push(events)
