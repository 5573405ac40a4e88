"""The metrics service's Prometheus series (names in the README, "Observability"): open watches,
and how long events take from their source to the log (observed as they are stored)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from segtrain.common.v1 import common_pb2

from services.common.timeutil import utcnow
from services.metrics_svc.hub import EventHub

APPENDED = Counter("segtrain_events_appended_total", "Events stored in job logs (duplicates of a retried relay "
                   "not counted).")
LAG = Histogram("segtrain_event_lag_seconds", "Seconds from an event's creation (on a trainer node, or in the "
                "pipeline service) to its storing in the log, from when watchers see it.",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))


def stored(events: Sequence[common_pb2.JobEvent]) -> None:
    now = utcnow()
    APPENDED.inc(len(events))
    for event in events:
        if event.HasField("event_time"):
            LAG.observe(max(0.0, (now - event.event_time.ToDatetime(tzinfo=UTC)).total_seconds()))


class WatchCollector(Collector):
    def __init__(self, hub: EventHub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        watches, jobs = self._hub.counts()
        yield GaugeMetricFamily("segtrain_watchers", "Open WatchJobEvents streams on this replica.", value=watches)
        yield GaugeMetricFamily("segtrain_watched_jobs", "Jobs with at least one open watch on this replica.",
                                value=jobs)
