"""How set preparation streams tiles: in order, a bounded number in flight (what bounds its memory
for any number of tiles), and nothing more started once the consumer stops."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

from services.pipeline_svc.resources.set_preparation import MemoryBudget, Tuning, _bounded_map


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


def test_the_memory_budget_holds_across_threads_and_a_tile_larger_than_it_runs_alone() -> None:
    budget = MemoryBudget(100)
    running, lock, alone = [0], threading.Lock(), []

    def tile(i: int) -> None:
        wanted = 250 if i % 10 == 0 else 10 + (i % 5) * 10  # every tenth needs more than the budget
        with budget.reserved(wanted) as held:
            with lock:
                running[0] += 1
                if wanted > budget.total:
                    alone.append(running[0] == 1)
            time.sleep(0.001)
            held.keep(wanted // 2)  # once its header is read, it needs less
            time.sleep(0.001)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=lambda k=k: [tile(i) for i in range(k, 200, 8)]) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert budget.peak <= budget.total
    assert alone and all(alone)  # the oversized tiles held the whole budget: nothing else ran beside them
    assert budget.reserve(100) == 100  # everything was given back
