"""Comparing jobs: configurations, their differences, aligned epoch metrics and drift from a
reference job (what a re-run with the same seed should reduce to zero on CPU). The epochs come
from the metrics service; the caller fetches them."""

from __future__ import annotations

from sqlmodel import Session

from services.common import names
from services.common.errors import InvalidArgumentError
from services.pipeline_svc.domain import ComparedJob, Comparison, Difference, Drift
from services.pipeline_svc.resources import hyperparameters, jobs
from services.pipeline_svc.tables import JobRow, TrainingSetRow

MAX_JOBS = 10
METRICS = ("train_loss", "val_loss", "train_iou", "val_iou")


def jobs_to_compare(session: Session, *, job_names: list[str]) -> list[tuple[JobRow, str]]:
    """The jobs, each with its training set's snapshot hash."""
    if not 2 <= len(job_names) <= MAX_JOBS:
        raise InvalidArgumentError.of("jobs", f"name 2 to {MAX_JOBS} jobs")
    rows = [jobs.get_job(session, name=name, field=f"jobs[{i}]") for i, name in enumerate(job_names)]
    return [(row, _snapshot(session.get(TrainingSetRow, row.training_set))) for row in rows]


def compare_jobs(compared: list[ComparedJob]) -> Comparison:
    return Comparison(jobs=compared, differences=differences(compared),
                      drift=[drift(compared[0], other) for other in compared[1:]])


def _snapshot(training_set: TrainingSetRow | None) -> str:
    return training_set.snapshot if training_set else ""


def _config(compared: ComparedJob) -> dict[str, str]:
    job = compared.job
    config = {"training_set": names.training_set(job.training_set),
              "training_set_snapshot": compared.training_set_snapshot,
              "from_model": names.model(job.from_model) if job.from_model else ""}
    for field, value in hyperparameters.deserialized(job.hyperparameters).items():
        config[f"hyperparameters.{field}"] = str(value)
    return config


def differences(compared: list[ComparedJob]) -> list[Difference]:
    configs = [_config(c) for c in compared]
    fields = sorted(set().union(*configs))
    return [Difference(field=f, values=[c.get(f, "") for c in configs])
            for f in fields if len({c.get(f, "") for c in configs}) > 1]


def drift(reference: ComparedJob, other: ComparedJob) -> Drift:
    mine = {m.epoch: m for m in reference.epochs}
    shared = [(mine[m.epoch], m) for m in other.epochs if m.epoch in mine]
    worst = {k: max((abs(getattr(a, k) - getattr(b, k)) for a, b in shared), default=0.0) for k in METRICS}
    return Drift(job=names.job(other.job.id), epochs_compared=len(shared),
                 identical=bool(shared) and all(v == 0 for v in worst.values()), largest=worst)
