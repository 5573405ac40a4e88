"""The relay's batching of a node's event stream (services.pipeline_svc.runtime.job_relay._batches):
what arrives while a batch is being relayed goes in the next one, in order, and the stream's end
or error comes after the events before it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2

from services.pipeline_svc.runtime.job_relay import _batches


def response(seq: int) -> trainer_pb2.WatchJobRunResponse:
    return trainer_pb2.WatchJobRunResponse(event=common_pb2.JobEvent(job="jobs/j-1", attempt=1, source_seq=seq))


class Stream:
    """A node's stream: one event, then (once the first batch is taken) `rest` more at once, then
    its end or `error`."""

    def __init__(self, rest: int, error: Exception | None = None) -> None:
        self.rest, self.error = rest, error
        self.first_taken = threading.Event()
        self.cancelled = False

    def __iter__(self) -> Iterator[trainer_pb2.WatchJobRunResponse]:
        yield response(1)
        assert self.first_taken.wait(10)
        yield from (response(s) for s in range(2, 2 + self.rest))
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


def test_events_that_arrive_while_a_batch_is_relayed_go_together_in_the_next() -> None:
    stream = Stream(rest=299)
    sizes, seqs = [], []
    for batch in _batches(stream, 500):  # type: ignore[arg-type]
        sizes.append(len(batch))
        seqs += [e.source_seq for e in batch]
        if len(sizes) == 1:
            stream.first_taken.set()
            time.sleep(0.5)  # relaying the first batch takes a while: the rest queue up meanwhile
    assert sizes == [1, 299]
    assert seqs == list(range(1, 301))
    assert stream.cancelled  # closing the batches ends the stream


def test_a_batch_holds_at_most_the_limit_and_an_error_comes_after_the_events_before_it() -> None:
    stream = Stream(rest=250, error=grpc.RpcError("stream broken"))
    sizes, seqs = [], []
    with pytest.raises(grpc.RpcError):
        for batch in _batches(stream, 100):  # type: ignore[arg-type]
            sizes.append(len(batch))
            seqs += [e.source_seq for e in batch]
            if len(sizes) == 1:
                stream.first_taken.set()
                time.sleep(0.5)
    assert sizes == [1, 100, 100, 50]
    assert seqs == list(range(1, 252))
