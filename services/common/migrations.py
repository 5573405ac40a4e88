"""Each service's schema under Alembic: its migrations (services/<service>/migrations/versions)
lead, in order, from the first schema that landed to the tables its code declares. Each service
has its own version table (`alembic_version_<service>`), so two services may even share one
database.

At start a service brings its database to the head revision, or refuses to start saying what to
do (SEGTRAIN_DATABASE_MIGRATE):
* ``auto`` (the default): a new, empty database gets the whole schema; one that is behind is
  refused, naming its revision, the head and the setting;
* ``true``: any database is upgraded (a database made before migrations existed, by
  ``create_all``, is taken to be at the first revision and upgraded from there);
* ``false``: nothing is created or changed; only a database at the head is served.
A database *ahead* of the code (a newer version migrated it) is always refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from services.common.locks import exclusive

Migrate = Literal["auto", "true", "false"]
FIRST_REVISION = "0001"


@dataclass(frozen=True)
class Schema:
    """A service's tables and the folder of its migrations."""

    service: str
    tables: Sequence[type]
    location: Path

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.service}"

    @property
    def table_names(self) -> frozenset[str]:
        return frozenset(t.__tablename__ for t in self.tables)  # type: ignore[attr-defined]


class SchemaMismatchError(RuntimeError):
    """The database is not at the revision the code expects, and may not be migrated now."""


def run_env(context: Any, schema: Schema) -> None:
    """The body of a service's migrations/env.py: runs its migrations on the connection the caller
    handed over (config.attributes["connection"]), over its own tables only."""
    connection: Connection = context.config.attributes["connection"]
    context.configure(connection=connection, **_options(schema))
    with context.begin_transaction():
        context.run_migrations()


def _options(schema: Schema) -> dict[str, Any]:
    def own(item: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        table = name if type_ == "table" else getattr(getattr(item, "table", None), "name", None)
        return table is None or table in schema.table_names

    # Batch mode: SQLite alters a table by copying it, which Alembic does for us.
    return {"target_metadata": SQLModel.metadata, "version_table": schema.version_table, "include_object": own,
            "render_as_batch": True, "compare_type": True, "compare_server_default": False}


def config(schema: Schema, connection: Connection | None = None) -> Config:
    """The Alembic configuration of a schema's migrations, running on `connection`."""
    settings = Config()
    settings.set_main_option("script_location", str(schema.location))
    settings.attributes["connection"] = connection
    return settings


def head(schema: Schema) -> str:
    revision = ScriptDirectory.from_config(config(schema)).get_current_head()
    assert revision is not None, f"{schema.location} has no migrations"
    return revision


def current(engine: Engine, schema: Schema) -> str | None:
    """The database's revision of the schema (None: never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection, opts={"version_table": schema.version_table}
                                          ).get_current_revision()


def upgrade(engine: Engine, schema: Schema, revision: str = "head") -> None:
    with engine.begin() as connection:
        command.upgrade(config(schema, connection), revision)


def stamp(engine: Engine, schema: Schema, revision: str) -> None:
    with engine.begin() as connection:
        command.stamp(config(schema, connection), revision)


def differences(engine: Engine, schema: Schema) -> list[Any]:
    """What autogenerate finds between the database and the code's tables (empty: they agree)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts=_options(schema))
        return list(compare_metadata(context, SQLModel.metadata))


def _known(schema: Schema, revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(config(schema)).get_revision(revision) is not None
    except CommandError:
        return False


def prepare(engine: Engine, schema: Schema, *, migrate: Migrate) -> None:
    """Brings the database to the head revision, or raises SchemaMismatchError saying what to do
    (see the module doc). Replicas starting together on one database take turns: the first
    migrates it, the others then find it at the head."""
    with exclusive(engine, f"migrate {schema.service}", wait=True):
        _prepare(engine, schema, migrate=migrate)


def _prepare(engine: Engine, schema: Schema, *, migrate: Migrate) -> None:
    wanted, found = head(schema), current(engine, schema)
    if found == wanted:
        return
    if found is not None and not _known(schema, found):
        raise SchemaMismatchError(
            f"the {schema.service} database is at schema revision {found}, which this version does not know "
            f"(its head is {wanted}): a newer version migrated it; run that version")
    existing = schema.table_names & set(inspect(engine).get_table_names())
    if found is None and not existing:
        if migrate == "false":
            raise SchemaMismatchError(f"the {schema.service} database is empty and SEGTRAIN_DATABASE_MIGRATE=false: "
                                      "create its schema with SEGTRAIN_DATABASE_MIGRATE=auto or true")
        upgrade(engine, schema)
        return
    if migrate != "true":
        at = found or "none (made before migrations)"
        raise SchemaMismatchError(
            f"the {schema.service} database is at schema revision {at}, behind this version's {wanted}: back it "
            "up, then start once with SEGTRAIN_DATABASE_MIGRATE=true to migrate it")
    if found is None:
        stamp(engine, schema, FIRST_REVISION)  # made by create_all: the first schema that landed
    upgrade(engine, schema)
