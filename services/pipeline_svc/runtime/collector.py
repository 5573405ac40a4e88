"""The storage collector: every SEGTRAIN_PIPELINE_COLLECT_INTERVAL_S it deletes the uploads nothing
will read any more once they are older than SEGTRAIN_PIPELINE_UPLOAD_TTL_S, and the objects no row
owns (a deleted resource's, when the object store was down during its delete, or a crash's) once
they are older than SEGTRAIN_PIPELINE_ORPHAN_GRACE_S. Ages are the objects' last-modified times,
the newest of each upload or folder: something written a moment ago is never taken, even if its
row is not committed yet."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine

from services.common import object_keys
from services.common.database import session_scope
from services.common.locks import exclusive
from services.common.storage import ObjectStore, StoredObject
from services.common.timeutil import utcnow
from services.pipeline_svc.resources import retention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collection:
    """How often the collector runs and what it lets go (seconds; a ttl of 0 keeps uploads)."""

    interval_s: float = 3600.0
    upload_ttl_s: float = 7 * 86400.0
    orphan_grace_s: float = 86400.0


DEFAULT_COLLECTION = Collection()


class Collector(threading.Thread):
    def __init__(self, engine: Engine, store: ObjectStore, *, interval_s: float, upload_ttl_s: float,
                 orphan_grace_s: float, stopping: threading.Event) -> None:
        super().__init__(name="storage-collector", daemon=True)
        self._engine, self._store, self._stopping = engine, store, stopping
        self._interval_s, self._upload_ttl_s, self._orphan_grace_s = interval_s, upload_ttl_s, orphan_grace_s

    def run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                with exclusive(self._engine, "storage collector") as mine:  # one replica's pass at a time
                    removed = self.collect_once() if mine else Counter()
                if removed:
                    log.info("storage collector removed %s", dict(removed))
            except Exception:
                log.exception("storage collector pass failed; retried at the next")

    def collect_once(self, now: datetime | None = None) -> Counter[str]:
        """One pass; how many uploads and orphan folders of each kind it removed."""
        now = now or utcnow()
        removed: Counter[str] = Counter()
        if self._upload_ttl_s > 0:
            removed["uploads"] = self._expire_uploads(now - timedelta(seconds=self._upload_ttl_s))
        grace = now - timedelta(seconds=self._orphan_grace_s)
        for prefix, table in retention.OWNED:
            removed[prefix.rstrip("/")] = self._collect_orphans(prefix, table, grace)
        return +removed

    def _expire_uploads(self, written_before: datetime) -> int:
        with session_scope(self._engine) as session:
            keep = retention.uploads_in_use(session, self._store)
        removed = 0
        for folder in self._store.list_folders(object_keys.UPLOADS):  # one upload's objects at a time
            if retention.upload_of(folder) not in keep:
                removed += self._remove({folder: self._store.list_objects(folder)}, written_before)
        return removed

    def _collect_orphans(self, prefix: str, table: type, written_before: datetime) -> int:
        ids = {folder.removeprefix(prefix).rstrip("/") for folder in self._store.list_folders(prefix)}
        with session_scope(self._engine) as session:
            orphans = ids - retention.with_rows(session, table, ids)
        return self._remove({i: self._store.list_objects(f"{prefix}{i}/") for i in orphans}, written_before)

    def _remove(self, groups: dict[str, list[StoredObject]], written_before: datetime) -> int:
        """Deletes each group whose newest object is older than `written_before`."""
        removed = 0
        for objects in groups.values():
            if objects and max(o.modified for o in objects) < written_before:
                self._store.delete_many([o.key for o in objects])
                removed += 1
        return removed
