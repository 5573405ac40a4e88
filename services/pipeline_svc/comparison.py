"""Comparing jobs: configurations, their differences, aligned epoch metrics and drift from a
reference job (what a re-run with the same seed should reduce to zero on CPU)."""

from __future__ import annotations

from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy.engine import Engine

from services.common import names
from services.common.database import session_scope
from services.common.errors import InvalidArgumentError
from services.pipeline_svc import jobs
from services.pipeline_svc.remote import Remotes
from services.pipeline_svc.tables import TrainingSetRow

MAX_JOBS = 10
METRICS = ("train_loss", "val_loss", "train_iou", "val_iou")


def compare(engine: Engine, remotes: Remotes, job_names: list[str]) -> pb.JobComparison:
    if not 2 <= len(job_names) <= MAX_JOBS:
        raise InvalidArgumentError.of("jobs", f"name 2 to {MAX_JOBS} jobs")
    with session_scope(engine) as session:
        rows = [jobs.get_row(session, name, field=f"jobs[{i}]") for i, name in enumerate(job_names)]
        snapshots = {r.id: _snapshot(session.get(TrainingSetRow, r.training_set)) for r in rows}
    series = []
    for row in rows:
        history = remotes.metrics.GetJobHistory(metrics_pb2.GetJobHistoryRequest(job=names.job(row.id)), timeout=30)
        series.append(pb.JobComparison.Series(
            job=names.job(row.id), training_set=names.training_set(row.training_set),
            training_set_snapshot=snapshots[row.id], from_model=names.model(row.from_model) if row.from_model else "",
            hyperparameters=common_pb2.Hyperparameters.FromString(row.hyperparameters), epochs=history.epochs,
            state=row.state,  # type: ignore[arg-type]
        ))
    return pb.JobComparison(series=series, differences=differences(series),
                            drift=[drift(series[0], other) for other in series[1:]])


def _snapshot(training_set: TrainingSetRow | None) -> str:
    return training_set.snapshot if training_set else ""


def _config(s: pb.JobComparison.Series) -> dict[str, str]:
    config = {"training_set": s.training_set, "training_set_snapshot": s.training_set_snapshot,
              "from_model": s.from_model}
    for field, value in s.hyperparameters.ListFields():
        config[f"hyperparameters.{field.name}"] = str(value)
    return config


def differences(series: list[pb.JobComparison.Series]) -> list[pb.JobComparison.Difference]:
    configs = [_config(s) for s in series]
    fields = sorted(set().union(*configs))
    return [pb.JobComparison.Difference(field=f, values=[c.get(f, "") for c in configs])
            for f in fields if len({c.get(f, "") for c in configs}) > 1]


def drift(reference: pb.JobComparison.Series, other: pb.JobComparison.Series) -> pb.JobComparison.Drift:
    mine = {m.epoch: m for m in reference.epochs}
    shared = [(mine[m.epoch], m) for m in other.epochs if m.epoch in mine]
    worst = {k: max((abs(getattr(a, k) - getattr(b, k)) for a, b in shared), default=0.0) for k in METRICS}
    return pb.JobComparison.Drift(
        job=other.job, epochs_compared=len(shared), identical=bool(shared) and all(v == 0 for v in worst.values()),
        **{f"max_{k}": v for k, v in worst.items()},
    )


