"""Runs training-set preparation off the request path: a few sets at a time, oldest first, each
on its own thread (resources.set_preparation streams its tiles). Sets still PREPARING when the
service starts (it stopped mid-way) are prepared again; a stopping service leaves them so. With
several replicas, one prepares each set (services/common/locks.py); another takes it over at its
next poll should that one die. An outage of the object store or the database under a preparation
leaves the set PREPARING and it starts again at the next poll, up to MAX_TRIES times."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import Engine

from services.common.database import session_scope
from services.common.locks import exclusive
from services.common.storage import ObjectStore
from services.pipeline_svc.resources import set_preparation, training_sets

log = logging.getLogger(__name__)
POLL_S = 5.0  # also picks up sets another path recorded without waking this one
MAX_TRIES = 5  # preparations of one set an outage may interrupt before the set is FAILED


class Preparer(threading.Thread):
    def __init__(self, engine: Engine, store: ObjectStore, *, concurrency: int, stopping: threading.Event,
                 tuning: set_preparation.Tuning = set_preparation.DEFAULT_TUNING) -> None:
        super().__init__(name="set-preparer", daemon=True)
        self._engine, self._store, self._stopping, self._tuning = engine, store, stopping, tuning
        # Shared by every set being prepared: what their tiles hold at once stays within it.
        self.budget = set_preparation.MemoryBudget(tuning.memory_bytes)
        self._slots = threading.Semaphore(concurrency)
        self._wake = threading.Event()
        self._running: dict[str, threading.Thread] = {}
        self._interrupted: dict[str, int] = {}  # set -> preparations an outage ended
        self._lock = threading.Lock()

    def wake(self) -> None:
        """A set was recorded PREPARING: start on it now rather than at the next poll."""
        self._wake.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                with session_scope(self._engine) as session:
                    waiting = [s for s in training_sets.preparing(session) if s not in self._running]
            except Exception:
                log.exception("set preparer could not read the sets to prepare; retrying")
                waiting = []
            for set_id in waiting:
                if not self._slots.acquire(timeout=0.1):
                    break  # all slots busy: the rest wait for the next pass
                self._start(set_id)
            self._wake.wait(POLL_S)

    def join_running(self, timeout: float) -> None:
        """Waits for the preparations in progress to notice `stopping` and return."""
        with self._lock:
            running = list(self._running.values())
        for thread in running:
            thread.join(timeout)

    def _start(self, set_id: str) -> None:
        thread = threading.Thread(target=self._prepare, args=(set_id,), name=f"prepare-{set_id}", daemon=True)
        with self._lock:
            self._running[set_id] = thread
        thread.start()

    def _prepare(self, set_id: str) -> None:
        done = False
        try:
            with exclusive(self._engine, f"prepare {set_id}") as mine:
                if mine:  # else another replica prepares it (and this one takes over if that one dies)
                    set_preparation.prepare(self._engine, self._store, set_id, stopping=self._stopping,
                                            tuning=self._tuning, budget=self.budget)
                    done = True
                    with self._lock:
                        self._interrupted.pop(set_id, None)
        except Exception as exc:  # the database or store failed under it: tried again at the next poll
            self._interrupted_by(set_id, exc)
        finally:
            with self._lock:
                self._running.pop(set_id, None)
            self._slots.release()
            if done:
                self._wake.set()  # a slot is free

    def _interrupted_by(self, set_id: str, exc: Exception) -> None:
        with self._lock:
            tries = self._interrupted[set_id] = self._interrupted.get(set_id, 0) + 1
        if tries < MAX_TRIES:
            log.warning("preparing training set %s was interrupted (%s: %s); try %d of %d in %.0f s",
                        set_id, type(exc).__name__, exc, tries + 1, MAX_TRIES, POLL_S)
            return
        log.error("preparing training set %s was interrupted %d times; giving up", set_id, tries, exc_info=exc)
        try:
            set_preparation.fail(self._engine, self._store, set_id,
                                 f"the pipeline service could not reach its object store or database for "
                                 f"{tries} tries ({type(exc).__name__}: {exc}); create the set again with the "
                                 "same request to retry")
        except Exception:
            log.exception("could not record training set %s FAILED; tried again at the next poll", set_id)
            return
        with self._lock:
            self._interrupted.pop(set_id, None)
