"""The pipeline service's first schema: what create_all made up to commit 1cceb4e.

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('event_outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('parked', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('park_reason', sqlmodel.sql.sqltypes.AutoString(), server_default='', nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('event_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_event_outbox_job'), ['job'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), server_default='training', nullable=False),
    sa.Column('display_name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('pipeline', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('training_set', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('from_model', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('pretrained_weights', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('hyperparameters', sa.LargeBinary(), nullable=False),
    sa.Column('state', sa.Integer(), nullable=False),
    sa.Column('failure_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('progress', sa.LargeBinary(), nullable=False),
    sa.Column('latest_metrics', sa.LargeBinary(), nullable=False),
    sa.Column('trainer_node', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('processes', sa.Integer(), server_default='1', nullable=False),
    sa.Column('nodes', sa.Integer(), server_default='1', nullable=False),
    sa.Column('gang_nodes', sa.JSON(), server_default='[]', nullable=False),
    sa.Column('relayed_source_seq', sa.Integer(), nullable=False),
    sa.Column('control_seq', sa.Integer(), nullable=False),
    sa.Column('checkpoint_uri', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('checkpoint_epoch', sa.Integer(), server_default='0', nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('stop_early', sa.Boolean(), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('normalization_reason', sqlmodel.sql.sqltypes.AutoString(), server_default='', nullable=False),
    sa.Column('quality_warnings', sa.JSON(), server_default='[]', nullable=False),
    sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('create_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('start_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('end_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('update_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_pipeline'), ['pipeline'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)

    op.create_table('models',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
    sa.Column('job', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('pipeline', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('training_set', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('training_set_snapshot', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('architecture', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('class_names', sa.JSON(), nullable=False),
    sa.Column('tile_size', sa.Integer(), nullable=False),
    sa.Column('finished', sa.LargeBinary(), nullable=False),
    sa.Column('weights_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), server_default='', nullable=False),
    sa.Column('parent_model', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('create_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job')
    )
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_models_pipeline'), ['pipeline'], unique=False)

    op.create_table('pipelines',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
    sa.Column('display_name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('type', sa.Integer(), nullable=False),
    sa.Column('class_names', sa.JSON(), nullable=False),
    sa.Column('tile_size', sa.Integer(), nullable=False),
    sa.Column('default_hyperparameters', sa.LargeBinary(), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('create_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id')
    )
    op.create_table('trainer_nodes',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
    sa.Column('address', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('capacity', sa.Integer(), nullable=False),
    sa.Column('device', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('job_memory_bytes', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('max_processes', sa.Integer(), server_default='1', nullable=False),
    sa.Column('state', sa.Integer(), nullable=False),
    sa.Column('heartbeat_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('training_sets',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
    sa.Column('display_name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('pipeline', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('class_names', sa.JSON(), nullable=False),
    sa.Column('state', sa.Integer(), server_default='2', nullable=False),
    sa.Column('spec', sa.LargeBinary(), server_default='', nullable=False),
    sa.Column('spec_hash', sqlmodel.sql.sqltypes.AutoString(length=80), server_default='', nullable=False),
    sa.Column('tiles_checked', sa.Integer(), server_default='0', nullable=False),
    sa.Column('failure_reason', sqlmodel.sql.sqltypes.AutoString(), server_default='', nullable=False),
    sa.Column('snapshot', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
    sa.Column('tile_count', sa.Integer(), nullable=False),
    sa.Column('train_tile_count', sa.Integer(), nullable=False),
    sa.Column('validation_tile_count', sa.Integer(), nullable=False),
    sa.Column('validation_fraction', sa.Float(), nullable=False),
    sa.Column('split_seed', sa.Integer(), nullable=False),
    sa.Column('report', sa.LargeBinary(), nullable=False),
    sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('create_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('update_time', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id')
    )
    with op.batch_alter_table('training_sets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_sets_pipeline'), ['pipeline'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_sets_snapshot'), ['snapshot'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_sets_state'), ['state'], unique=False)

    op.create_table('analyses',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('training_set', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('tile_count', sa.Integer(), nullable=False),
    sa.Column('inputs_uri', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('output', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('analyses', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_analyses_model'), ['model'], unique=False)

    op.create_table('tiles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('training_set', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('image_uri', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('mask_uri', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('source_image', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('validation', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['training_set'], ['training_sets.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('training_set', 'name', name='uq_tile_name')
    )
    with op.batch_alter_table('tiles', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tiles_training_set'), ['training_set'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('tiles', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tiles_training_set'))

    op.drop_table('tiles')
    with op.batch_alter_table('analyses', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_analyses_model'))

    op.drop_table('analyses')
    with op.batch_alter_table('training_sets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_sets_state'))
        batch_op.drop_index(batch_op.f('ix_training_sets_snapshot'))
        batch_op.drop_index(batch_op.f('ix_training_sets_pipeline'))

    op.drop_table('training_sets')
    op.drop_table('trainer_nodes')
    op.drop_table('pipelines')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_models_pipeline'))

    op.drop_table('models')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_jobs_pipeline'))
        batch_op.drop_index(batch_op.f('ix_jobs_kind'))

    op.drop_table('jobs')
    with op.batch_alter_table('event_outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_event_outbox_job'))

    op.drop_table('event_outbox')
