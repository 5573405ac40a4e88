"""The trainer-node registry: registration, heartbeats, and which nodes can take work."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlmodel import Session, col, select

from services.common import job_states, names
from services.common.errors import FieldViolation, PermissionDeniedError, check
from services.common.timeutil import as_utc, utcnow
from services.common.tokens import Principal
from services.pipeline_svc.domain import HeartbeatAnswer, NodeHeartbeat, NodeRegistration
from services.pipeline_svc.resources import lifecycle
from services.pipeline_svc.resources.jobs import MAX_PROCESSES
from services.pipeline_svc.tables import JobRow, TrainerNodeRow

READY, DRAINING, LOST = pb.TrainerNode.STATE_READY, pb.TrainerNode.STATE_DRAINING, pb.TrainerNode.STATE_LOST


def check_caller(caller: Principal | None, node_id: str) -> None:
    """A node registers and heartbeats only itself: its token is bound to its node id (caller
    None: no authentication, loopback only)."""
    if caller is not None and not caller.is_node(node_id):
        raise PermissionDeniedError(f"this token is not node {node_id!r}'s: a node token registers and "
                                    "heartbeats only the node it was made for")


def register_node(session: Session, *, registration: NodeRegistration, caller: Principal | None) -> TrainerNodeRow:
    r = registration
    v = []
    if not names.is_valid_id(r.node_id):
        v.append(FieldViolation("node_id", "1-63 lowercase letters, digits or '-'"))
    if not r.address or ":" not in r.address:
        v.append(FieldViolation("address", "required, host:port"))
    if r.capacity < 0 or r.capacity > 64:
        v.append(FieldViolation("capacity", "must be 0..64 (0 means 1)"))
    if r.job_memory_bytes < 0:
        v.append(FieldViolation("job_memory_bytes", "must be >= 0 (0: unknown)"))
    if not 0 <= r.max_processes <= MAX_PROCESSES:
        v.append(FieldViolation("max_processes", f"must be 0..{MAX_PROCESSES} (0 means 1)"))
    check(v)
    check_caller(caller, r.node_id)
    row = session.get(TrainerNodeRow, r.node_id) or TrainerNodeRow(id=r.node_id, address="", state=READY)
    row.address, row.capacity, row.device = r.address, r.capacity or 1, r.device
    row.job_memory_bytes, row.max_processes = r.job_memory_bytes, r.max_processes or 1
    row.state, row.heartbeat_time = READY, utcnow()
    session.add(row)
    return row


def record_heartbeat(session: Session, *, heartbeat: NodeHeartbeat, caller: Principal | None) -> HeartbeatAnswer:
    """Renews the node; answers whether it is known and which of its jobs it should stop."""
    node_id = names.parse_name(heartbeat.name, names.TRAINER_NODES)
    check_caller(caller, node_id)
    row = session.get(TrainerNodeRow, node_id)
    if row is None:
        return HeartbeatAnswer(known=False, stop_jobs=[])
    row.heartbeat_time, row.state = utcnow(), DRAINING if heartbeat.draining else READY
    session.add(row)
    running = {lifecycle.log_name(j): j for j in jobs_on_node(session, node_id=node_id)}
    # A job the node reports but no longer holds here (cancelled, re-assigned) must stop there.
    return HeartbeatAnswer(known=True, stop_jobs=[
        name for name in heartbeat.jobs if name not in running or running[name].cancel_requested])


def jobs_on_node(session: Session, *, node_id: str) -> list[JobRow]:
    """Active jobs with an attempt on the node: as rank 0, or as another node of a multi-node job."""
    active = session.exec(select(JobRow).where(col(JobRow.state).in_(job_states.ACTIVE)))
    return [job for job in active if job.trainer_node == node_id or node_id in job.gang_nodes]


def list_nodes(session: Session) -> list[TrainerNodeRow]:
    return list(session.exec(select(TrainerNodeRow).order_by(col(TrainerNodeRow.id))))


def ready_nodes(session: Session) -> list[TrainerNodeRow]:
    return [n for n in list_nodes(session) if n.state == READY]


def mark_lost_nodes(session: Session, *, timeout: timedelta) -> list[str]:
    """Marks nodes whose heartbeat is older than `timeout` LOST; returns their ids."""
    cutoff = utcnow() - timeout
    lost = []
    for row in session.exec(select(TrainerNodeRow).where(TrainerNodeRow.state != LOST)):
        if as_utc(row.heartbeat_time) < cutoff:
            row.state = LOST
            session.add(row)
            lost.append(row.id)
    return lost


def free_nodes(session: Session) -> list[tuple[TrainerNodeRow, int]]:
    """READY nodes with free capacity, least loaded first (the active jobs read once)."""
    load = load_by_node(session)
    result = [(row, row.capacity - load[row.id]) for row in ready_nodes(session)]
    return sorted([pair for pair in result if pair[1] > 0], key=lambda pair: -pair[1])


def lock_room(session: Session, gang: list[TrainerNodeRow]) -> bool:
    """Locks the gang's node rows (in id order, so two schedulers never wait on each other) and
    says whether each is still READY with room, counting what was assigned since it was read."""
    ids = sorted(n.id for n in gang)
    rows = list(session.exec(select(TrainerNodeRow).where(col(TrainerNodeRow.id).in_(ids))
                             .order_by(col(TrainerNodeRow.id)).with_for_update()))
    load = load_by_node(session)
    return len(rows) == len(ids) and all(row.state == READY and row.capacity > load[row.id] for row in rows)


def load_by_node(session: Session) -> Counter[str]:
    """Active jobs per node."""
    load: Counter[str] = Counter()
    for job in session.exec(select(JobRow).where(col(JobRow.state).in_(job_states.ACTIVE))):
        load.update(set(job.gang_nodes) | {job.trainer_node})
    return load
