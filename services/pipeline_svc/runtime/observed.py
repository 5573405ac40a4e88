"""The pipeline service's Prometheus series, read from its database when scraped (every replica
reports the same values: aggregate them with max, not sum). Names in the README, "Observability"."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from services.common.database import session_scope
from services.pipeline_svc.runtime import nodes
from services.pipeline_svc.tables import JobRow

log = logging.getLogger(__name__)


class PipelineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            with session_scope(self._engine) as session:
                counts = list(session.exec(select(JobRow.kind, JobRow.state, func.count())
                                           .group_by(col(JobRow.kind), col(JobRow.state))))
                node_rows = nodes.list_nodes(session)
                load = nodes.load_by_node(session)
        except Exception:  # a scrape must not fail because the database is down: its series are left out
            log.exception("could not read the job and node counts for /metrics")
            return
        jobs = GaugeMetricFamily("segtrain_jobs", "Jobs (training and analysis) by kind and state.",
                                 labels=["kind", "state"])
        queued = 0
        for kind, state, count in counts:
            jobs.add_metric([kind, common_pb2.JobState.Name(state).removeprefix("JOB_STATE_")], count)
            queued += count if state == common_pb2.JOB_STATE_QUEUED else 0
        yield jobs
        yield GaugeMetricFamily("segtrain_queue_depth", "Jobs waiting for a trainer node (QUEUED).", value=queued)
        by_state = GaugeMetricFamily("segtrain_trainer_nodes", "Registered trainer nodes by state.", labels=["state"])
        for state in (nodes.READY, nodes.DRAINING, nodes.LOST):
            by_state.add_metric([pb.TrainerNode.State.Name(state).removeprefix("STATE_")],
                                sum(1 for row in node_rows if row.state == state))
        yield by_state
        capacity = GaugeMetricFamily("segtrain_trainer_node_capacity", "Jobs a trainer node runs at once.",
                                     labels=["node"])
        used = GaugeMetricFamily("segtrain_trainer_node_jobs", "Active jobs with an attempt on a trainer node.",
                                 labels=["node"])
        for row in node_rows:
            capacity.add_metric([row.id], row.capacity)
            used.add_metric([row.id], load[row.id])
        yield capacity
        yield used
