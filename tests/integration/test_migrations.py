"""Each service's migrations on SQLite and PostgreSQL: they lead from the first schema that landed
to the tables the code declares with no difference autogenerate can find, keep the rows they find,
and a service starts on a database behind its code only when told to migrate it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy

from services.common import migrations
from services.common.database import make_engine
from services.common.migrations import Schema, SchemaMismatchError
from services.common.settings import PipelineSettings, StorageSettings
from services.metrics_svc.tables import SCHEMA as METRICS
from services.pipeline_svc import app as pipeline_app
from services.pipeline_svc.tables import SCHEMA as PIPELINE

SCHEMAS = pytest.mark.parametrize("schema", [PIPELINE, METRICS], ids=["pipeline", "metrics"])


def bare(url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(url)


@SCHEMAS
def test_the_migrations_lead_to_the_code_s_tables_with_no_difference(database_url: str, schema: Schema) -> None:
    engine = make_engine(database_url, schema)
    assert migrations.current(engine, schema) == migrations.head(schema)
    assert migrations.differences(engine, schema) == []
    # Only its own tables (and its own version table): two services may share one database.
    other = METRICS if schema is PIPELINE else PIPELINE
    assert not other.table_names & set(sqlalchemy.inspect(engine).get_table_names())
    engine.dispose()


def _a_set_at_the_first_schema(engine: sqlalchemy.engine.Engine) -> None:
    migrations.upgrade(engine, PIPELINE, migrations.FIRST_REVISION)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(
            "INSERT INTO training_sets (id, display_name, pipeline, class_names, snapshot, tile_count, "
            "train_tile_count, validation_tile_count, validation_fraction, split_seed, report, create_time) "
            "VALUES ('ts-old', 'Old set', 'segmentation', '[\"a\", \"b\"]', 'sha256:0', 2, 1, 1, 0.5, 0, :report, "
            ":created)"), {"report": b"", "created": "2026-11-01 00:00:00"})


def test_a_database_at_the_first_schema_is_migrated_keeping_its_rows(database_url: str) -> None:
    engine = bare(database_url)
    _a_set_at_the_first_schema(engine)
    assert migrations.differences(engine, PIPELINE) != []  # the owner columns are missing
    migrations.upgrade(engine, PIPELINE)
    assert migrations.differences(engine, PIPELINE) == []
    with engine.connect() as connection:
        row = connection.execute(sqlalchemy.text(
            "SELECT display_name, owner, state FROM training_sets WHERE id = 'ts-old'")).one()
    assert tuple(row) == ("Old set", "", 2)  # kept, with the new column's default
    engine.dispose()


@pytest.mark.parametrize("migrate", ["auto", "false"])
def test_a_database_behind_the_code_is_refused_saying_what_to_do(database_url: str, migrate: str) -> None:
    engine = bare(database_url)
    _a_set_at_the_first_schema(engine)
    expected = rf"revision 0001, behind this version's {migrations.head(PIPELINE)}.*SEGTRAIN_DATABASE_MIGRATE=true"
    with pytest.raises(SchemaMismatchError, match=expected):
        make_engine(database_url, PIPELINE, migrate=migrate)  # type: ignore[arg-type]
    assert migrations.current(engine, PIPELINE) == "0001"  # untouched
    engine.dispose()


def test_migrate_true_upgrades_a_database_behind_and_one_made_before_migrations(database_url: str) -> None:
    engine = bare(database_url)
    _a_set_at_the_first_schema(engine)
    with engine.begin() as connection:  # as create_all left it: no version table
        connection.execute(sqlalchemy.text(f"DROP TABLE {PIPELINE.version_table}"))
    with pytest.raises(SchemaMismatchError, match="made before migrations"):
        make_engine(database_url, PIPELINE)
    upgraded = make_engine(database_url, PIPELINE, migrate="true")
    assert migrations.current(upgraded, PIPELINE) == migrations.head(PIPELINE)
    assert migrations.differences(upgraded, PIPELINE) == []
    upgraded.dispose()
    engine.dispose()


def test_a_database_ahead_of_the_code_or_empty_with_migrate_false_is_refused(database_url: str) -> None:
    with pytest.raises(SchemaMismatchError, match="is empty and SEGTRAIN_DATABASE_MIGRATE=false"):
        make_engine(database_url, PIPELINE, migrate="false")
    engine = make_engine(database_url, PIPELINE)
    with engine.begin() as connection:  # as a newer version would leave it
        connection.execute(sqlalchemy.text(f"UPDATE {PIPELINE.version_table} SET version_num = '9999'"))
    for migrate in ("auto", "true", "false"):
        with pytest.raises(SchemaMismatchError, match="9999, which this version does not know"):
            make_engine(database_url, PIPELINE, migrate=migrate)  # type: ignore[arg-type]
    engine.dispose()


def test_the_pipeline_service_refuses_to_start_on_a_database_behind_it(tmp_path: Path,
                                                                       s3_settings: StorageSettings) -> None:
    url = f"sqlite:///{tmp_path / 'pipeline.db'}"
    _a_set_at_the_first_schema(bare(url))
    with pytest.raises(SchemaMismatchError, match="the pipeline database is at schema revision 0001"):
        pipeline_app.build(PipelineSettings(listen="127.0.0.1:0", database_url=url), s3_settings)



START_REPLICA = """
import sys
from services.common import migrations
from services.common.database import make_engine
from services.metrics_svc.tables import SCHEMA as METRICS
from services.pipeline_svc.tables import SCHEMA as PIPELINE
schema = PIPELINE if sys.argv[2] == "pipeline" else METRICS
engine = make_engine(sys.argv[1], schema, migrate="true")
print(migrations.current(engine, schema))
"""


def test_replicas_starting_together_migrate_the_database_once_between_them(database_url: str) -> None:
    """Three replicas of each service start at once on one empty database (the local stack and
    compose start replicas together): they take turns, so every one finds the schema at the head."""
    services = ["pipeline", "metrics"] * 3
    replicas = [subprocess.Popen([sys.executable, "-c", START_REPLICA, database_url, service], text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for service in services]
    results = [replica.communicate(timeout=120) for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0] * len(services), [err[-2000:] for _, err in results]
    heads = {"pipeline": migrations.head(PIPELINE), "metrics": migrations.head(METRICS)}
    assert [out.strip() for out, _ in results] == [heads[service] for service in services]


START_PIPELINE = """
import sys
from services.common.settings import PipelineSettings, StorageSettings
from services.pipeline_svc import app
storage = StorageSettings(endpoint=sys.argv[2], access_key=sys.argv[3], secret_key=sys.argv[4])
_, _, _, service = app.build(PipelineSettings(listen="127.0.0.1:0", database_url=sys.argv[1],
                                              database_migrate="true"), storage)
service.start()
service.stop()
print("started")
"""


def test_pipeline_replicas_starting_together_seed_the_default_pipelines_once(
        database_url: str, s3_settings: StorageSettings) -> None:
    """Seen under the 1,000-watcher load test: the second replica crashed on a duplicate key."""
    replicas = [subprocess.Popen([sys.executable, "-c", START_PIPELINE, database_url, s3_settings.endpoint,
                                  s3_settings.access_key, s3_settings.secret_key.get_secret_value()],
                                 text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    results = [replica.communicate(timeout=120) for replica in replicas]
    assert [r.returncode for r in replicas] == [0] * 4, [err[-1500:] for _, err in results]
    engine = sqlalchemy.create_engine(database_url)
    with engine.connect() as connection:
        ids = [row[0] for row in connection.execute(sqlalchemy.text("SELECT id FROM pipelines ORDER BY id"))]
    engine.dispose()
    from services.pipeline_svc.resources.pipelines import ANALYSIS_PIPELINE, DEFAULT_PIPELINE

    assert ids == sorted([ANALYSIS_PIPELINE, DEFAULT_PIPELINE])
