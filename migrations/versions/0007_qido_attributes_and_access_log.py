"""DICOMweb: the study attributes QIDO-RS returns, and the access log of API clients

Studies gain Patient's Birth Date and Sex, Referring Physician's Name,
Study ID and the Specific Character Set they arrived in (NULL for studies
archived before this revision). ``access_log`` records every request of a
client of ``medarchive serve``: the token's name, what, when, bytes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 09:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_birth_date", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("patient_sex", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("referring_physician_name", sa.String(length=330), nullable=True))
        batch_op.add_column(sa.Column("dicom_study_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("specific_character_set", sa.String(length=128), nullable=True))
    op.create_table(
        "access_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_name", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_log")),
    )
    with op.batch_alter_table("access_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_access_log_token_name"), ["token_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_access_log_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_access_log_target"), ["target"], unique=False)
        batch_op.create_index(batch_op.f("ix_access_log_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("access_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_access_log_created_at"))
        batch_op.drop_index(batch_op.f("ix_access_log_target"))
        batch_op.drop_index(batch_op.f("ix_access_log_action"))
        batch_op.drop_index(batch_op.f("ix_access_log_token_name"))
    op.drop_table("access_log")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("specific_character_set")
        batch_op.drop_column("dicom_study_id")
        batch_op.drop_column("referring_physician_name")
        batch_op.drop_column("patient_sex")
        batch_op.drop_column("patient_birth_date")
