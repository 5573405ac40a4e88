"""Reading and writing job event logs. Functions take the session and keyword arguments."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from segtrain.common.v1 import common_pb2
from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from services.common.timeutil import utcnow
from services.metrics_svc.tables import JobEventRow


def last_seq(session: Session, *, job: str) -> int:
    value = session.exec(select(func.max(JobEventRow.seq)).where(JobEventRow.job == job)).one()
    return int(value or 0)


def expire_logs(session: Session, *, written_before: datetime, limit: int) -> int:
    """Deletes the whole logs (at most `limit` jobs) whose newest event is older than
    `written_before`; returns how many."""
    stale = list(session.exec(select(JobEventRow.job).group_by(col(JobEventRow.job))
                              .having(func.max(JobEventRow.event_time) < written_before).limit(limit)))
    if stale:
        session.execute(delete(JobEventRow).where(col(JobEventRow.job).in_(stale)))
    return len(stale)


def delete_log(session: Session, *, job: str) -> int:
    """Deletes the job's whole log; how many events it held."""
    return int(session.execute(delete(JobEventRow).where(col(JobEventRow.job) == job)).rowcount or 0)  # type: ignore[attr-defined]


def truncate_logs(session: Session, *, keep: int, limit: int) -> int:
    """Keeps the newest `keep` events of every log (at most `limit` jobs a call): an oldest prefix
    goes, so what is held stays one run of seqs. Returns how many logs were cut."""
    long = list(session.exec(select(JobEventRow.job, func.max(JobEventRow.seq)).group_by(col(JobEventRow.job))
                             .having(func.count() > keep).limit(limit)))
    for job, last in long:
        session.execute(delete(JobEventRow).where(col(JobEventRow.job) == job, col(JobEventRow.seq) <= last - keep))
    return len(long)


def last_source_seq(session: Session, *, job: str, attempt: int) -> int:
    value = session.exec(
        select(func.max(JobEventRow.source_seq)).where(JobEventRow.job == job, JobEventRow.attempt == attempt)
    ).one()
    return int(value or 0)


def append(session: Session, *, job: str, events: Sequence[common_pb2.JobEvent]) -> list[common_pb2.JobEvent]:
    """Stores the events not stored yet, numbering them after the log's last seq.

    Returns the stored events (with seq set). Events whose (attempt, source_seq) is at or below
    what is stored for that attempt are duplicates of a retried relay and are skipped.
    """
    seq = last_seq(session, job=job)
    high: dict[int, int] = {}
    stored: list[common_pb2.JobEvent] = []
    for event in events:
        if event.attempt not in high:
            high[event.attempt] = last_source_seq(session, job=job, attempt=event.attempt)
        if event.source_seq <= high[event.attempt]:
            continue
        high[event.attempt] = event.source_seq
        seq += 1
        copy = common_pb2.JobEvent()
        copy.CopyFrom(event)
        copy.seq = seq
        copy.job = job
        if not copy.HasField("event_time"):
            copy.event_time.FromDatetime(utcnow())
        session.add(JobEventRow(
            job=job, seq=seq, attempt=event.attempt, source_seq=event.source_seq,
            kind=copy.WhichOneof("payload") or "", event_time=copy.event_time.ToDatetime(tzinfo=UTC),
            payload=copy.SerializeToString(),
        ))
        stored.append(copy)
    return stored


def read(session: Session, *, job: str, after_seq: int, limit: int) -> list[common_pb2.JobEvent]:
    rows = session.exec(
        select(JobEventRow.payload)
        .where(JobEventRow.job == job, JobEventRow.seq > after_seq)
        .order_by(col(JobEventRow.seq))
        .limit(limit)
    ).all()
    return [common_pb2.JobEvent.FromString(payload) for payload in rows]


def read_kind(session: Session, *, jobs: Sequence[str], kind: str) -> list[common_pb2.JobEvent]:
    rows = session.exec(
        select(JobEventRow.payload)
        .where(col(JobEventRow.job).in_(jobs), JobEventRow.kind == kind)
        .order_by(col(JobEventRow.job), col(JobEventRow.seq))
    ).all()
    return [common_pb2.JobEvent.FromString(payload) for payload in rows]
