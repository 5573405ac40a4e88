"""Relay leases: the pipeline replica whose relay follows each job, and until when.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('relay_owner', sqlmodel.sql.sqltypes.AutoString(length=64), server_default='',
                                      nullable=False))
        batch_op.add_column(sa.Column('relay_lease_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('relay_lease_until')
        batch_op.drop_column('relay_owner')
