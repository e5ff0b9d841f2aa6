"""Studies archived before revision 0007 get their QIDO attributes from their kept headers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from pydicom.data import get_charset_files, get_testdata_file
from sqlalchemy import select, update

from archive.catalog.models import Study
from archive.services.backfill import fill_study_attributes
from archive.services.ingest import ingest_paths
from archive.services.runtime import Archive

COLUMNS = ("patient_birth_date", "patient_sex", "referring_physician_name", "dicom_study_id",
           "specific_character_set")


def _expected(path: Path) -> dict[str, str | None]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return "\\".join(str(v) for v in value) if isinstance(value, pydicom.multival.MultiValue) else str(value)

    return {"patient_birth_date": text("PatientBirthDate"), "patient_sex": text("PatientSex"),
            "referring_physician_name": text("ReferringPhysicianName"), "dicom_study_id": text("StudyID"),
            "specific_character_set": text("SpecificCharacterSet") or ""}


def _columns(archive: Archive, study_uid: str) -> dict[str, str | None]:
    with archive.unit_of_work() as uow:
        study = uow.session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None
        return {column: getattr(study, column) for column in COLUMNS}


def test_old_studies_are_filled_from_their_headers_once(archive: Archive, tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    files = [source / name for name in ("CT_small.dcm", "chrFren.dcm", "MR_small.dcm")]
    for path in files:
        shutil.copy(get_charset_files(path.name)[0] if path.name.startswith("chr") else get_testdata_file(path.name),
                    path)
    ingest_paths(archive, [source])
    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID: p for p in files}
    for uid, path in studies.items():
        assert _columns(archive, uid) == _expected(path), path.name  # ingest fills them
    with archive.unit_of_work() as uow:  # as an archive of revision 0006 upgraded: NULL everywhere
        uow.session.execute(update(Study).values({column: None for column in COLUMNS}))
        uow.commit()

    assert fill_study_attributes(archive) == len(studies)
    for uid, path in studies.items():
        assert _columns(archive, uid) == _expected(path), path.name
    assert any(_expected(p)["specific_character_set"] == "ISO_IR 100" for p in files)  # chrFren: Latin-1
    assert fill_study_attributes(archive) == 0  # done once: "" marks a study without a character set
