"""Every process's logging: text lines for a terminal, or one JSON object per line
(SEGTRAIN_LOG_FORMAT=json) for a log pipeline (Loki, Elasticsearch, CloudWatch...). A record
logged while a job attempt is being worked on (`about_job`: a relay following it, a node's
threads supervising it, the worker process training it) carries the job and the attempt, so that
one attempt's lines can be found across the three services.

JSON fields: `time` (UTC, ISO 8601), `level`, `logger`, `message`, `process`, `thread`, and
`job`, `attempt`, `exception` when there are any."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TypeVar

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
T = TypeVar("T")

# (job name, attempt) that the current thread's records concern. A thread starts with none
# (threads do not inherit contexts); `in_job` wraps a thread's target.
_JOB: ContextVar[tuple[str, int] | None] = ContextVar("segtrain_log_job", default=None)


@contextmanager
def about_job(job: str, attempt: int = 0) -> Iterator[None]:
    """Records logged inside carry `job` (a job's or an analysis's resource name) and `attempt`."""
    token = _JOB.set((job, attempt))
    try:
        yield
    finally:
        _JOB.reset(token)


def in_job(job: str, attempt: int, target: Callable[..., T]) -> Callable[..., T]:
    """`target`, run `about_job(job, attempt)`: for the target of a thread that works on one attempt."""
    def run(*args: object, **kwargs: object) -> T:
        with about_job(job, attempt):
            return target(*args, **kwargs)
    return run


def for_this_process(job: str, attempt: int) -> None:
    """Every record of the calling thread from now on concerns this attempt (a worker process's main thread)."""
    _JOB.set((job, attempt))


class _JobFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job, record.attempt = _JOB.get() or ("", 0)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": record.process, "thread": record.threadName,
        }
        job, attempt = getattr(record, "job", ""), getattr(record, "attempt", 0)
        if job:
            data["job"] = job
        if attempt:
            data["attempt"] = attempt
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        return json.dumps(data, ensure_ascii=False, default=str)


def configure(level: str, fmt: LogFormat = "text") -> None:
    """The root logger writes `fmt` records of `level` and above to stderr."""
    handler = logging.StreamHandler()
    handler.addFilter(_JobFields())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
