"""Writes the next migration of a service's schema: what Alembic's autogenerate finds between the
head of its migrations and the tables its code declares now. Review the file it writes (renames
look like a drop and an add), then run `make test`: tests/integration/test_migrations.py checks on
SQLite and PostgreSQL that the migrations lead to the code's tables.

    .venv/bin/python scripts/new_migration.py pipeline "what changes"
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from services.common import migrations
from services.metrics_svc.tables import SCHEMA as METRICS
from services.pipeline_svc.tables import SCHEMA as PIPELINE

SCHEMAS = {"pipeline": PIPELINE, "metrics": METRICS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", choices=sorted(SCHEMAS))
    parser.add_argument("message")
    args = parser.parse_args()
    schema = SCHEMAS[args.service]
    revision = f"{int(migrations.head(schema)) + 1:04d}"
    with tempfile.TemporaryDirectory() as folder:
        engine = create_engine(f"sqlite:///{Path(folder) / 'head.db'}")
        migrations.upgrade(engine, schema)
        if not migrations.differences(engine, schema):
            print(f"the {args.service} tables match the head of their migrations ({migrations.head(schema)}): "
                  "nothing to write")
            return 1
        with engine.begin() as connection:
            command.revision(migrations.config(schema, connection), message=args.message, autogenerate=True,
                             rev_id=revision)
        engine.dispose()
    print(f"wrote revision {revision} in {schema.location / 'versions'}: review it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
