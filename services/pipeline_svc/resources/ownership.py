"""Who may act on what, and how much one principal may run at once.

Jobs, analyses, training sets and models record the principal that created them (`owner`). A
trainer may start, cancel and delete only its own jobs and analyses, and delete only its own sets
and models; admins (and the services) may act on any. Without authentication (loopback only)
there is no caller and no check. A principal has at most `limit` jobs and analyses queued or
running at once (SEGTRAIN_PIPELINE_MAX_ACTIVE_JOBS_PER_PRINCIPAL)."""

from __future__ import annotations

from segtrain.common.v1 import common_pb2
from sqlalchemy import func
from sqlmodel import Session, col, select

from services.common import job_states
from services.common.database import lock_name
from services.common.errors import PermissionDeniedError, QuotaExceededError
from services.common.tokens import Principal, Role
from services.pipeline_svc.tables import JobRow

QUOTA = "max_active_jobs_per_principal"
# What counts against the quota: jobs waiting for a node and jobs on one.
_COUNTED = (common_pb2.JOB_STATE_QUEUED, *job_states.ACTIVE)


def check_may_act(caller: Principal | None, *, owner: str, resource: str, action: str) -> None:
    """PERMISSION_DENIED unless the caller owns the resource or is an admin."""
    if caller is None or caller.role.grants(Role.ADMIN) or caller.name == owner:
        return
    whose = f"belongs to {owner}" if owner else "has no recorded owner"
    raise PermissionDeniedError(f"{resource} {whose}: only its owner or an admin may {action} it")


def check_quota(session: Session, *, owner: str, limit: int) -> None:
    """RESOURCE_EXHAUSTED naming the quota when `owner` already has `limit` jobs queued or
    running (0: no limit). Checked and then acted on under a per-owner lock, so that concurrent
    starts of one owner cannot both take the last place."""
    if not limit or not owner:
        return
    lock_name(session, f"quota:{owner}")
    active = session.exec(select(func.count()).select_from(JobRow).where(
        JobRow.owner == owner, col(JobRow.state).in_(_COUNTED))).one()
    if active >= limit:
        raise QuotaExceededError(
            f"{owner} has {active} jobs queued or running, the most one principal may have at once "
            f"({QUOTA} = {limit}, SEGTRAIN_PIPELINE_MAX_ACTIVE_JOBS_PER_PRINCIPAL); start this one when one ends",
            quota=QUOTA, subject=f"principal:{owner}")
