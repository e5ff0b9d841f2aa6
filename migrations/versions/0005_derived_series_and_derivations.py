"""derived series, derivations, one current encoding per instance

A normalized (and later any derived) series is a Series with
``derived_from_id``; its instances point at their main source; a
``derivations`` row records how it was made and what it cost. Study totals
count derived series apart. "One current encoding per instance", assumed so
far, is now a partial unique index.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 02:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("num_derived_series", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("num_derived_instances", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("bytes_derived", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("derived_from_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_series_derived_from_id"), ["derived_from_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_series_derived_from_id_series"), "series",
                                    ["derived_from_id"], ["id"])
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("derived_from_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_instances_derived_from_id"), ["derived_from_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_instances_derived_from_id_instances"), "instances",
                                    ["derived_from_id"], ["id"])
    with op.batch_alter_table("encodings", schema=None) as batch_op:
        batch_op.create_index("uq_encodings_one_current", ["instance_id"], unique=True,
                              sqlite_where=sa.text("is_current"), postgresql_where=sa.text("is_current"))
    op.create_table(
        "derivations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("source_series_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("params_sha256", sa.String(length=64), nullable=False),
        sa.Column("software_version", sa.String(length=32), nullable=False),
        sa.Column("source_geometry", sa.JSON(), nullable=False),
        sa.Column("target_geometry", sa.JSON(), nullable=False),
        sa.Column("transform", sa.JSON(), nullable=False),
        sa.Column("interpolation", sa.String(length=16), nullable=False),
        sa.Column("across_slices", sa.Boolean(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("rmse", sa.Float(), nullable=True),
        sa.Column("max_abs_error", sa.Float(), nullable=True),
        sa.Column("error_pixels", sa.Integer(), nullable=True),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], name=op.f("fk_derivations_series_id_series")),
        sa.ForeignKeyConstraint(["source_series_id"], ["series.id"],
                                name=op.f("fk_derivations_source_series_id_series")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_derivations_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_derivations")),
        sa.UniqueConstraint("series_id", name=op.f("uq_derivations_series_id")),
    )
    with op.batch_alter_table("derivations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_derivations_source_series_id"), ["source_series_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_derivations_job_id"), ["job_id"], unique=False)
        batch_op.create_index("ix_derivations_source_current", ["source_series_id", "is_current"], unique=False)


def downgrade() -> None:
    op.drop_table("derivations")
    with op.batch_alter_table("encodings", schema=None) as batch_op:
        batch_op.drop_index("uq_encodings_one_current")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_instances_derived_from_id_instances"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_instances_derived_from_id"))
        batch_op.drop_column("derived_from_id")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_series_derived_from_id_series"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_series_derived_from_id"))
        batch_op.drop_column("derived_from_id")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("bytes_derived")
        batch_op.drop_column("num_derived_instances")
        batch_op.drop_column("num_derived_series")
