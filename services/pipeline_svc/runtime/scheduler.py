"""The scheduler: assigns queued jobs to trainer nodes with free capacity, keeps one relay per
active job, and hands back the jobs of nodes that stopped heartbeating.

Replicas share the work over one database: claims lock the job and its nodes, and each active
job's relay runs on exactly one replica, the holder of the job's relay lease (`relay_owner`,
`relay_lease_until`). The replica that assigns a job takes its lease; every pass renews the
leases a replica holds and takes those that have lapsed (their holder died), so another replica
resumes a dead one's relays within the lease period, from the last relayed event. A relay that
finds its lease taken stops (`JobRelay` checks it in each transaction that changes the job)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from segcore import admission
from services.common import job_states, names, object_keys
from services.common.database import session_scope
from services.common.errors import UnavailableError
from services.common.storage import ObjectStore
from services.common.timeutil import utcnow
from services.pipeline_svc import converters
from services.pipeline_svc.resources import analyses, jobs, lifecycle, models, training_sets
from services.pipeline_svc.runtime import nodes
from services.pipeline_svc.runtime.job_relay import JobRelay
from services.pipeline_svc.runtime.peers import PeerStubs
from services.pipeline_svc.tables import JobRow, PipelineRow, TrainerNodeRow

log = logging.getLogger(__name__)
S = common_pb2


@dataclass
class Claim:
    """A job just assigned to its nodes (rank order), and the RunJob request each gets."""

    job: JobRow
    request: trainer_pb2.RunJobRequest
    members: list[tuple[str, str]]  # (node id, address)


class Scheduler(threading.Thread):
    def __init__(self, engine: Engine, peers: PeerStubs, store: ObjectStore, *, interval_s: float,
                 heartbeat_interval_s: float, max_attempts: int, stopping: threading.Event,
                 wake_outbox: Callable[[], None], relay_lease_s: float = 10.0, replica: str | None = None) -> None:
        super().__init__(name="scheduler", daemon=True)
        self._engine, self._peers, self._store = engine, peers, store
        self.replica = replica or f"replica-{uuid.uuid4().hex[:12]}"
        self._lease = timedelta(seconds=relay_lease_s)
        self._interval_s = interval_s
        self._max_attempts = max_attempts
        self._stopping = stopping
        self._wake_outbox = wake_outbox
        self._lost_after = timedelta(seconds=3 * heartbeat_interval_s)
        # Nodes could not heartbeat while this service was down: judge them only after twice the
        # lease period of this process's life (reconnecting, a node also waits out its channel's
        # backoff; on a loaded machine its first heartbeats may take a while).
        self._judge_nodes_after = time.monotonic() + 2 * self._lost_after.total_seconds()
        self._pending = threading.Event()
        # Jobs a node refused, left out of placement until their hold ends (it doubles with each
        # refusal): a job no node will take never holds back the ones queued behind it.
        self._held: dict[str, _Hold] = {}
        self._relays: dict[str, JobRelay] = {}
        self._starting: set[str] = set()  # jobs whose attempt is being handed to its nodes
        self._lock = threading.Lock()

    def wake(self) -> None:
        """Something changed (a job queued, a node registered or freed): run a pass now."""
        self._pending.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._pending.clear()  # before the pass: a wake during it runs another at once
            try:
                self.tick()
            except Exception:
                log.exception("scheduler pass failed")
            self._pending.wait(self._interval_s)

    def stop_relays(self) -> None:
        """Ends every relay's stream (call after setting `stopping`)."""
        self._pending.set()
        with self._lock:
            relays = list(self._relays.values())
        for relay in relays:
            relay.stop()

    def tick(self) -> None:
        """One pass: hand back work of lost nodes, assign queued jobs, (re)start relays."""
        if time.monotonic() >= self._judge_nodes_after:
            with session_scope(self._engine) as session:
                lost = nodes.mark_lost_nodes(session, timeout=self._lost_after)
            for node_id in lost:
                self._hand_back(node_id)
        while self._assign_one():
            pass
        with session_scope(self._engine) as session:
            if self._held:  # holds end with the job's wait (it started, failed or was cancelled)
                waiting = set(session.exec(select(JobRow.id).where(
                    col(JobRow.id).in_(list(self._held)), JobRow.state == S.JOB_STATE_QUEUED)))
                self._held = {j: hold for j, hold in self._held.items() if j in waiting}
        owned = self.renew_leases()
        for job_id in owned:
            self._ensure_relay(job_id)
        with self._lock:
            taken = [relay for job_id, relay in self._relays.items() if job_id not in owned]
        for relay in taken:  # another replica holds the job now: this one lets go at once
            relay.stop()

    def renew_leases(self) -> set[str]:
        """Renews this replica's relay leases and takes the lapsed ones; the active jobs it holds."""
        now = utcnow()
        with session_scope(self._engine, serialized=True) as session:
            session.execute(update(JobRow).where(
                col(JobRow.state).in_(job_states.ACTIVE),
                or_(col(JobRow.relay_owner).in_((self.replica, "")), col(JobRow.relay_lease_until).is_(None),
                    col(JobRow.relay_lease_until) < now),
            ).values(relay_owner=self.replica, relay_lease_until=now + self._lease))
            return set(session.exec(select(JobRow.id).where(
                col(JobRow.state).in_(job_states.ACTIVE), JobRow.relay_owner == self.replica)))

    def release_leases(self) -> None:
        """Gives this replica's relay leases up (a graceful stop): another replica takes them at
        its next pass rather than when they lapse."""
        with session_scope(self._engine, serialized=True) as session:
            session.execute(update(JobRow).where(col(JobRow.relay_owner) == self.replica)
                            .values(relay_owner="", relay_lease_until=None))

    def _hand_back(self, node_id: str) -> None:
        with session_scope(self._engine, serialized=True) as session:
            handed_back = []
            for seen in nodes.jobs_on_node(session, node_id=node_id):
                job = lifecycle.locked(session, seen.id)
                if job is None or job.state not in job_states.ACTIVE or node_id not in (job.trainer_node,
                                                                                        *job.gang_nodes):
                    continue  # it ended or moved since it was read
                handed_back.append(job)
                log.warning("trainer node %s lost; re-queueing %s", node_id, lifecycle.log_name(job))
                lifecycle.requeue(session, job=job, reason=f"trainer node {node_id} stopped responding",
                                  max_attempts=self._max_attempts)
        self._wake_outbox()
        for job in handed_back:
            # Its relay may be waiting on the lost node's stream (a frozen process answers nothing
            # until keepalive gives up): end that stream so the next attempt is followed at once.
            self._interrupt_relay(job.id)

    def _assign_one(self) -> bool:
        """Starts the oldest queued job that fits the free nodes (all its nodes or none), leaving
        out the jobs on hold; True when it tried one (so the pass goes on with the next)."""
        claimed = self.claim_one()
        if not isinstance(claimed, Claim):
            return claimed
        try:
            self._wake_outbox()
            return self._start(claimed.job, claimed.request, claimed.members)
        finally:
            with self._lock:
                self._starting.discard(claimed.job.id)

    def claim_one(self) -> Claim | bool:
        """Assigns the oldest queued job that fits (one transaction): the claim, or False when
        nothing fits, or True when the job chosen was taken or cancelled meanwhile (look again).
        The job is marked starting (``_is_starting``) until the caller has handed it to its nodes."""
        now = time.monotonic()
        marked = ""
        try:
            with session_scope(self._engine, serialized=True) as session:
                placement = _placement(session, held={j for j, hold in self._held.items() if hold.until > now})
                if placement is None:
                    return False
                chosen, gang = placement
                # Locked and read again: another scheduler or a cancel may have got there first
                # (PostgreSQL; on SQLite the serialized session keeps every other writer out).
                job = lifecycle.locked(session, chosen.id)
                if job is None or job.state != S.JOB_STATE_QUEUED or not nodes.lock_room(session, gang):
                    return True
                with self._lock:  # before the assignment is committed: a relay may read it at once
                    self._starting.add(job.id)
                marked = job.id
                job.attempt += 1
                job.trainer_node, job.gang_nodes = gang[0].id, [n.id for n in gang]
                job.relayed_source_seq = 0
                # This replica follows what it starts (its relay may read the job at once).
                job.relay_owner, job.relay_lease_until = self.replica, utcnow() + self._lease
                lifecycle.transition(session, job=job, to=S.JOB_STATE_ASSIGNED)
                claim = Claim(job, _run_request(session, job), [(n.id, n.address) for n in gang])
        except BaseException:
            with self._lock:
                self._starting.discard(marked)
            raise
        return claim

    def _start(self, job: JobRow, request: trainer_pb2.RunJobRequest, members: list[tuple[str, str]]) -> bool:
        """Hands the assigned attempt to its nodes; a refusal undoes the assignment and holds the job."""
        try:
            self._publish_tiles(request, node_id=members[0][0])
            self._start_gang(request, members)
        except _Refused as refused:
            log.warning("trainer node %s refused %s: %s %s", refused.node_id, lifecycle.log_name(job), refused.code,
                        refused.details)
            self._undo_assignment(job, refused)
            hold = self._held.get(job.id)
            self._held[job.id] = hold = _Hold.after(hold)
            log.info("%s held for %.0f s", lifecycle.log_name(job), hold.until - time.monotonic())
            return True  # the next job in the queue may fit where this one did not
        self._held.pop(job.id, None)
        self._ensure_relay(job.id)
        return True

    def _is_starting(self, job_id: str) -> bool:
        """Whether RunJob of the job's current attempt is still on its way to its nodes (a relay
        that asks that attempt's node for its stream meanwhile is told NOT_FOUND)."""
        with self._lock:
            return job_id in self._starting

    def _publish_tiles(self, request: trainer_pb2.RunJobRequest, *, node_id: str) -> None:
        try:
            publish_tiles(self._store, request)
        except UnavailableError as exc:
            raise _Refused(node_id, grpc.StatusCode.UNAVAILABLE, f"object store: {exc.message}", store=True) from None

    def _start_gang(self, request: trainer_pb2.RunJobRequest, members: list[tuple[str, str]]) -> None:
        """RunJob on every node of the attempt in rank order: rank 0 first, whose answer is the
        rendezvous the others join. When one refuses, those already started are told to stop."""
        started: list[tuple[str, str]] = []
        for rank, (node_id, address) in enumerate(members):
            request.node_rank = rank
            try:
                response = self._peers.trainer(node_id, address).RunJob(request, timeout=30)
            except grpc.RpcError as exc:
                for other in started:
                    self._peers.stop_job_on(*other, job=request.job, stop_early=False)
                raise _Refused(node_id, exc.code(), exc.details() or "", started=bool(started)) from None
            started.append((node_id, address))
            if rank == 0 and len(members) > 1:
                request.rendezvous_endpoint = response.rendezvous_endpoint

    def _undo_assignment(self, job: JobRow, refused: _Refused) -> None:
        with session_scope(self._engine, serialized=True) as session:
            fresh = lifecycle.locked(session, job.id)
            if fresh is not None and fresh.state == S.JOB_STATE_ASSIGNED and fresh.attempt == job.attempt:
                if not refused.started:
                    fresh.attempt -= 1  # the attempt started nowhere: it does not count
                # (one that some node started keeps its number: a node never sees one reused)
                if refused.for_good:
                    # The same request would be refused again by every node: retrying cannot help.
                    lifecycle.transition(session, job=fresh, to=S.JOB_STATE_FAILED,
                                         reason=f"trainer node {refused.node_id} refused the job "
                                                f"({refused.code.name}: {refused.details})")
                else:
                    lifecycle.requeue(session, job=fresh,
                                      reason=f"trainer node {refused.node_id} could not take the job",
                                      max_attempts=self._max_attempts)
            stale = session.get(TrainerNodeRow, refused.node_id)
            if stale is not None and refused.code == grpc.StatusCode.UNAVAILABLE and not refused.store:
                stale.state = nodes.LOST
                session.add(stale)

    def _ensure_relay(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._relays or self._stopping.is_set():
                return
            relay = JobRelay(self._engine, self._peers, self._store, job_id=job_id, owner=self.replica,
                             max_attempts=self._max_attempts,
                             starting=self._is_starting,
                             stopping=self._stopping, wake_outbox=self._wake_outbox, on_exit=self._relay_exited)
            self._relays[job_id] = relay
        relay.start()

    def _interrupt_relay(self, job_id: str) -> None:
        with self._lock:
            relay = self._relays.get(job_id)
        if relay is not None:
            relay.stop()

    def _relay_exited(self, job_id: str) -> None:
        with self._lock:
            self._relays.pop(job_id, None)
        self.wake()  # a node may have freed up


def publish_tiles(store: ObjectStore, request: trainer_pb2.RunJobRequest) -> None:
    """Moves the request's tiles to the attempt's manifest object, which the request then names
    with its size and sha256: RunJob stays small whatever the size of the set."""
    if not request.tiles:
        return  # an analysis: its inputs are an object already
    manifest = trainer_pb2.TileManifest(tiles=request.tiles).SerializeToString()
    key = object_keys.attempt_tile_manifest(request.output_prefix)
    store.put(key, manifest, content_type="application/x-protobuf")
    request.ClearField("tiles")
    request.tile_manifest.CopyFrom(common_pb2.Artifact(uri=key, size_bytes=len(manifest),
                                                        sha256=hashlib.sha256(manifest).hexdigest()))


class _Refused(Exception):
    """A node of the attempt refused RunJob (`started`: after others had accepted it)."""

    def __init__(self, node_id: str, code: grpc.StatusCode, details: str, *, started: bool = False,
                 store: bool = False) -> None:
        super().__init__(node_id, code)
        self.node_id, self.code, self.details, self.started = node_id, code, details, started
        self.store = store  # the object store failed, not the node

    @property
    def for_good(self) -> bool:
        """A malformed request (INVALID_ARGUMENT), or one larger than a message may be: no node
        and no retry would take it. (FAILED_PRECONDITION means a node that is full or draining.)"""
        too_large = self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in self.details
        return self.code == grpc.StatusCode.INVALID_ARGUMENT or too_large


@dataclass(frozen=True)
class _Hold:
    """A refused job's time out of placement: 1 s after the first refusal, doubling to 60 s."""

    until: float
    refusals: int

    @classmethod
    def after(cls, previous: _Hold | None) -> _Hold:
        refusals = (previous.refusals if previous else 0) + 1
        return cls(time.monotonic() + min(60.0, 2.0 ** (refusals - 1)), refusals)


# Queued jobs looked at per pass: a job that fits no free node does not hold back the ones behind it.
_LOOKAHEAD = 50


def _placement(session: Session, held: Collection[str] = ()) -> tuple[JobRow, list[TrainerNodeRow]] | None:
    """The oldest queued job not `held` that fits, with its nodes in rank order (least loaded
    first): each free, starting the job's processes, and offering the memory it needs
    (segcore.admission)."""
    free = [node for node, _ in nodes.free_nodes(session)]
    if not free:
        return None
    query = select(JobRow).where(JobRow.state == S.JOB_STATE_QUEUED)
    if held:
        query = query.where(col(JobRow.id).not_in(list(held)))
    queued = session.exec(query.order_by(col(JobRow.start_time)).limit(_LOOKAHEAD))
    for job in queued:
        shape = _shape(session, job)
        able = [n for n in free if n.max_processes >= job.processes
                and shape.refusal(n.job_memory_bytes or None, n.device) is None]
        if len(able) >= job.nodes:
            return job, able[: job.nodes]
    return None


def _shape(session: Session, job: JobRow) -> admission.JobShape:
    if job.kind == jobs.ANALYSIS:
        return analyses.shape(job, models.get_model(session, name=job.from_model))
    pipeline = session.get(PipelineRow, job.pipeline)
    assert pipeline is not None
    return jobs.job_shape(job, tile_size=pipeline.tile_size)


def _run_request(session: Session, job: JobRow) -> trainer_pb2.RunJobRequest:
    # Jobs reference rows that are never deleted; the foreign keys were checked at creation.
    if job.kind == jobs.ANALYSIS:
        analysis = analyses.get_analysis(session, name=names.analysis(job.id))
        return converters.run_analysis_request(analysis, model=models.get_model(session, name=job.from_model))
    training_set = training_sets.get_training_set(session, name=job.training_set)
    pipeline = session.get(PipelineRow, job.pipeline)
    assert pipeline is not None
    parent = models.get_model(session, name=job.from_model) if job.from_model else None
    return converters.run_job_request(job, training_set=training_set, tile_size=pipeline.tile_size,
                                      tiles=training_sets.tiles_of(session, set_id=training_set.id), parent=parent)
