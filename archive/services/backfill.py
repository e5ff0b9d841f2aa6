"""Use case: fill the Study columns a newer schema revision added, for studies archived before it.

Revision 0007 gave studies the attributes QIDO-RS returns (Patient's Birth
Date and Sex, Referring Physician's Name, Study ID, Specific Character Set).
Studies archived earlier hold NULL there; their headers, kept in the blob
store, have the values. ``medarchive db upgrade`` and ``medarchive serve``
read one header per such study, in batches, so that an upgraded archive
answers searches like a new one.
"""

from __future__ import annotations

from sqlalchemy import select

from archive.catalog.models import Instance, Series, Study
from archive.dicom.writer import read_header
from archive.services.runtime import Archive
from archive.services.staging import qido_study_columns

BATCH = 200  # studies per transaction


def fill_study_attributes(archive: Archive) -> int:
    """Fill the revision-0007 columns of every study that lacks them; returns how many studies were filled.

    A study with no readable instance header keeps NULL and is not counted
    (``specific_character_set`` set to "" marks a study as done).
    """
    filled = 0
    last_id = 0
    while True:
        with archive.unit_of_work() as uow:
            studies = list(uow.session.scalars(
                select(Study).where(Study.specific_character_set.is_(None), Study.id > last_id)
                .order_by(Study.id).limit(BATCH)))
            if not studies:
                return filled
            for study in studies:
                last_id = study.id
                instance = uow.session.scalars(
                    select(Instance).join(Series)
                    .where(Series.study_id == study.id, Series.derived_from_id.is_(None), Instance.conflict_seq == 0)
                    .order_by(Series.id, Instance.id).limit(1)).first()
                if instance is None:
                    continue
                try:
                    header = read_header(uow.read_header(instance.header_blob, instance.header_dictionary))
                except Exception:  # noqa: BLE001  (a damaged blob is verify's to report; the study stays NULL)
                    continue
                for column, value in qido_study_columns(header).items():
                    setattr(study, column, value)
                filled += 1
            uow.commit()
