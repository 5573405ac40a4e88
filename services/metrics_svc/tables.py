"""The metrics service's tables: one append-only event log per job."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import Column, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.migrations import Schema


class JobEventRow(SQLModel, table=True):
    """One event of a job's log. (job, seq) is gap-free from 1; (job, attempt, source_seq) makes
    appends idempotent."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job", "attempt", "source_seq", name="uq_job_event_source"),)

    job: str = Field(primary_key=True, max_length=128)
    seq: int = Field(primary_key=True)
    attempt: int
    source_seq: int
    # Name of the JobEvent payload ("epoch_metrics", "batch_progress", ...), for filtering.
    kind: str = Field(max_length=32)
    event_time: datetime
    # The serialized segtrain.common.v1.JobEvent, seq included.
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


TABLES = [JobEventRow]
# The tables and their migrations (services/common/migrations.py).
SCHEMA = Schema("metrics", TABLES, Path(__file__).parent / "migrations")
