"""What object storage must keep: the uploads still to be read, and the prefixes that belong to a
row. Everything else may go once it is old enough (runtime.collector)."""

from __future__ import annotations

import json

from sqlmodel import Session, col, select

from services.common import job_states, object_keys
from services.common.storage import ObjectStore
from services.pipeline_svc.resources import jobs, training_sets
from services.pipeline_svc.tables import AnalysisRow, JobRow, TrainingSetRow


def uploads_in_use(session: Session, store: ObjectStore) -> set[str]:
    """The upload ids something will still read: a PREPARING set's files, the pretrained weights of
    a job that has not ended, the images of an analysis that has not ended."""
    keys: list[str] = []
    for row in session.exec(select(TrainingSetRow).where(TrainingSetRow.state == training_sets.PREPARING)):
        spec = training_sets.spec_of(row)
        keys += [spec.annotations_key, *(k for t in spec.tiles for k in (t.image_key, t.annotation_key))]
    for job in session.exec(select(JobRow).where(col(JobRow.state).not_in(job_states.TERMINAL))):
        keys.append(job.pretrained_weights)
        if job.kind == jobs.ANALYSIS and not job.training_set:
            analysis = session.get(AnalysisRow, job.id)
            if analysis is not None:
                lines = store.get(analysis.inputs_uri).decode().splitlines()
                keys += [json.loads(line)["image"] for line in lines]
    return {upload_of(k) for k in keys if k.startswith(object_keys.UPLOADS)}


def upload_of(key: str) -> str:
    """The upload id of an `uploads/{upload_id}/{file}` key."""
    return key.removeprefix(object_keys.UPLOADS).split("/", 1)[0]


# Prefixes owned by rows: the folder under each, and the rows that own them.
OWNED = ((object_keys.SNAPSHOTS, TrainingSetRow), (object_keys.JOBS, JobRow), (object_keys.ANALYSES, JobRow))


def with_rows(session: Session, table: type[TrainingSetRow] | type[JobRow], ids: set[str]) -> set[str]:
    """Those of `ids` that have a row in `table` (asked 1000 at a time: a query stays small however
    many folders there are)."""
    ordered, found = sorted(ids), set()
    for start in range(0, len(ordered), 1000):
        found |= set(session.exec(select(table.id).where(col(table.id).in_(ordered[start:start + 1000]))))
    return found
