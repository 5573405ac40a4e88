"""How set preparation streams tiles: in order, a bounded number in flight (what bounds its memory
for any number of tiles), and nothing more started once the consumer stops."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

from services.pipeline_svc.resources.set_preparation import Tuning, _bounded_map


def test_results_come_in_order_with_at_most_window_tiles_started_and_not_consumed() -> None:
    started, lock = [0], threading.Lock()

    def work(i: int) -> int:
        with lock:
            started[0] += 1
        time.sleep(0.001 * (i % 3))  # out-of-order completion
        return i * 2

    consumed, ahead = [], []
    for result in _bounded_map(work, range(200), Tuning(threads=4, window=8)):
        time.sleep(0.0005)  # a consumer slower than the workers
        consumed.append(result)
        with lock:
            ahead.append(started[0] - len(consumed))
    assert consumed == [2 * i for i in range(200)]
    assert max(ahead) <= 8 and max(ahead) >= 4  # the window is used, never exceeded


def test_a_consumer_that_stops_leaves_the_rest_unstarted() -> None:
    started = []

    def work(i: int) -> int:
        started.append(i)
        return i

    with contextlib.closing(_bounded_map(work, range(10_000), Tuning(threads=2, window=4))) as results:
        first = list(itertools.islice(results, 5))
    assert first == [0, 1, 2, 3, 4]
    assert len(started) <= 5 + 4
