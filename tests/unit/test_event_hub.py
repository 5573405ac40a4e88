"""The metrics service's fan-out (services/metrics_svc/hub.py): a publication reaches every watcher
that was there, in publication order per job, a chunk of watchers per turn of the event loop so
that other work (an append's reply) waits for one chunk, not for all of a job's watchers."""

from __future__ import annotations

import asyncio

from segtrain.common.v1 import common_pb2

from services.metrics_svc.hub import FANOUT_CHUNK, EventHub


def event(seq: int) -> common_pb2.JobEvent:
    return common_pb2.JobEvent(job="jobs/j-1", seq=seq)


def test_every_watcher_gets_each_publication_in_order_and_other_work_runs_between_chunks() -> None:
    async def scenario() -> tuple[list[list[int]], int, list[int]]:
        hub = EventHub(capacity=100)
        subs = [hub.subscribe("jobs/j-1") for _ in range(5 * FANOUT_CHUNK + 3)]
        other = hub.subscribe("jobs/j-2")
        served_when: list[int] = []  # how many watchers had seq 1 when the loop served other work

        def other_work() -> None:
            served_when.append(sum(1 for s in subs if s._events))

        hub.publish("jobs/j-1", [event(1)])
        asyncio.get_running_loop().call_soon(other_work)
        hub.publish("jobs/j-1", [event(2), event(3)])
        hub.publish("jobs/j-2", [event(1)])
        late = hub.subscribe("jobs/j-1")  # after the publications: it reads them from the store
        for _ in range(50):
            await asyncio.sleep(0)
        got = [[p.event.seq for p in await s.take(0)] for s in subs]
        return got, len(await late.take(0)), [p.event.seq for p in await other.take(0)] + served_when

    got, late, rest = asyncio.run(scenario())
    assert all(seqs == [1, 2, 3] for seqs in got)
    assert late == 0
    other_job, served_when = rest[:1], rest[1]
    assert other_job == [1]  # another job's publication does not wait for this one's
    assert served_when < len(got)  # the loop served other work before every watcher was woken
