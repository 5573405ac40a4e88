"""Alembic's entry to the pipeline service's migrations (services/common/migrations.py runs them)."""

from alembic import context

from services.common.migrations import run_env
from services.pipeline_svc.tables import SCHEMA

run_env(context, SCHEMA)
