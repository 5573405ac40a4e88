"""The job state machine: every legal transition, and the active and terminal sets other modules
ask about. The pipeline service is the only one that moves a job; the metrics service needs to
know which state ends a job's log."""

from __future__ import annotations

from segtrain.common.v1 import common_pb2

S = common_pb2
TERMINAL = frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED})
# States in which a trainer node holds the job.
ACTIVE = frozenset({S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLING})

# Every legal transition; anything else is FAILED_PRECONDITION.
TRANSITIONS: dict[int, frozenset[int]] = {
    S.JOB_STATE_PENDING: frozenset({S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLED}),
    S.JOB_STATE_QUEUED: frozenset({S.JOB_STATE_ASSIGNED, S.JOB_STATE_CANCELLED}),
    S.JOB_STATE_ASSIGNED: frozenset({S.JOB_STATE_RUNNING, S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLING,
                                     S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED}),
    S.JOB_STATE_RUNNING: frozenset({S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLING, S.JOB_STATE_SUCCEEDED,
                                    S.JOB_STATE_FAILED}),
    S.JOB_STATE_CANCELLING: frozenset({S.JOB_STATE_CANCELLED, S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED}),
}


def can_move(state: int, to: int) -> bool:
    return to in TRANSITIONS.get(state, frozenset())


def state_name(state: int) -> str:
    return S.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]
