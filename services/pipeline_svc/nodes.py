"""The trainer-node registry: registration, heartbeats, and which nodes can take work."""

from __future__ import annotations

from datetime import timedelta

from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.common import names
from services.common.database import session_scope
from services.common.errors import FieldViolation, check
from services.common.timeutil import utcnow
from services.pipeline_svc.jobs import ACTIVE
from services.pipeline_svc.tables import JobRow, TrainerNodeRow

READY, DRAINING, LOST = pb.TrainerNode.STATE_READY, pb.TrainerNode.STATE_DRAINING, pb.TrainerNode.STATE_LOST


def register(engine: Engine, request: pb.RegisterTrainerNodeRequest) -> TrainerNodeRow:
    v = []
    if not names.is_valid_id(request.node_id):
        v.append(FieldViolation("node_id", "1-63 lowercase letters, digits or '-'"))
    if not request.address or ":" not in request.address:
        v.append(FieldViolation("address", "required, host:port"))
    if request.capacity < 0 or request.capacity > 64:
        v.append(FieldViolation("capacity", "must be 0..64 (0 means 1)"))
    check(v)
    with session_scope(engine) as session:
        row = session.get(TrainerNodeRow, request.node_id)
        row = row or TrainerNodeRow(id=request.node_id, address="", state=READY)
        row.address, row.capacity, row.device = request.address, request.capacity or 1, request.device
        row.state, row.heartbeat_time = READY, utcnow()
        session.add(row)
    return row


def heartbeat(engine: Engine, request: pb.HeartbeatTrainerNodeRequest) -> tuple[bool, list[str]]:
    """Renews the node; returns (known, jobs the node should stop)."""
    node_id = names.parse_name(request.name, names.TRAINER_NODES)
    with session_scope(engine) as session:
        row = session.get(TrainerNodeRow, node_id)
        if row is None:
            return False, []
        row.heartbeat_time, row.state = utcnow(), DRAINING if request.draining else READY
        session.add(row)
        running = {names.job(j.id): j for j in jobs_on(session, node_id)}
    # A job the node reports but no longer holds here (cancelled, re-assigned) must stop there.
    return True, [name for name in request.jobs if name not in running or running[name].cancel_requested]


def jobs_on(session: Session, node_id: str) -> list[JobRow]:
    return list(session.exec(select(JobRow).where(JobRow.trainer_node == node_id,
                                                  col(JobRow.state).in_(ACTIVE))))


def list_rows(session: Session) -> list[TrainerNodeRow]:
    return list(session.exec(select(TrainerNodeRow).order_by(col(TrainerNodeRow.id))))


def mark_lost(engine: Engine, timeout: timedelta) -> list[str]:
    """Marks nodes whose heartbeat is older than `timeout` LOST; returns their ids."""
    cutoff = utcnow() - timeout
    lost = []
    with session_scope(engine) as session:
        for row in session.exec(select(TrainerNodeRow).where(TrainerNodeRow.state != LOST)):
            beat = row.heartbeat_time if row.heartbeat_time.tzinfo else row.heartbeat_time.replace(tzinfo=cutoff.tzinfo)
            if beat < cutoff:
                row.state = LOST
                session.add(row)
                lost.append(row.id)
    return lost


def free_nodes(session: Session) -> list[tuple[TrainerNodeRow, int]]:
    """READY nodes with free capacity, least loaded first."""
    result = []
    for row in session.exec(select(TrainerNodeRow).where(TrainerNodeRow.state == READY)):
        free = row.capacity - len(jobs_on(session, row.id))
        if free > 0:
            result.append((row, free))
    return sorted(result, key=lambda pair: -pair[1])
