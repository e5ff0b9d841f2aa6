"""QIDO-RS search on a catalog of bulk-inserted studies: paging, the server's limit and its warning, parameters."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select

from archive.catalog.models import Series, Study
from archive.errors import ArchiveError, NotFoundError
from archive.services.qido import (
    DEFAULT_LIMIT,
    FUZZY_IGNORED,
    TRUNCATED,
    query_attribute_names,
    search_series,
    search_studies,
)
from archive.services.runtime import Archive

COUNT = DEFAULT_LIMIT + 5


@pytest.fixture
def catalog(archive: Archive) -> Archive:
    """The conftest's archive (SQLite and PostgreSQL) with COUNT bulk-inserted studies of one series each."""
    with archive.unit_of_work() as uow:
        uow.session.execute(insert(Study), [
            dict(study_uid=f"2.25.{i + 1}", patient_id=f"P{i % 10}", patient_name=f"Name{i}^Given",
                 study_date=f"2020{1 + i % 12:02d}{1 + i % 28:02d}", modalities_in_study="CT" if i % 2 else "MR",
                 num_series=1, num_instances=1)
            for i in range(COUNT)] + [dict(study_uid="2.25.0", patient_id="L1", patient_name="Äneas^Rüdiger")])
        ids = {uid: pk for uid, pk in uow.session.execute(select(Study.study_uid, Study.id))}
        uow.session.execute(insert(Series), [
            dict(study_id=ids[f"2.25.{i + 1}"], series_uid=f"2.25.{i + 1}.1", modality="CT" if i % 2 else "MR",
                 series_number=1)
            for i in range(COUNT)])
        uow.commit()
    return archive


def _uids(matches: list[dict[str, object]]) -> list[str]:
    return [m["0020000D"]["Value"][0] for m in matches]  # type: ignore[index]


def test_the_server_limit_cuts_with_a_warning_and_offset_pages_on(catalog: Archive) -> None:
    archive = catalog
    first = search_studies(archive, {})
    assert len(first.matches) == DEFAULT_LIMIT and first.warnings == [TRUNCATED]
    rest = search_studies(archive, {"offset": [str(DEFAULT_LIMIT)]})
    assert len(rest.matches) == COUNT + 1 - DEFAULT_LIMIT and rest.warnings == []
    assert len(set(_uids(first.matches)) | set(_uids(rest.matches))) == COUNT + 1
    asked = search_studies(archive, {"limit": [str(DEFAULT_LIMIT)]})
    assert asked.warnings == []  # the client's own limit: nothing to warn about
    everything = search_studies(archive, {"limit": ["1000000"]})  # over the cap: capped, all of these fit
    assert len(everything.matches) == COUNT + 1 and everything.warnings == []


def test_matching_on_a_bulk_catalog(catalog: Archive) -> None:
    archive = catalog
    ct = search_studies(archive, {"ModalitiesInStudy": ["ct"], "PatientID": ["P1"], "limit": ["1000"]})
    assert ct.matches and all(m["00080061"]["Value"] == ["CT"] for m in ct.matches)
    assert all(m["00100020"]["Value"] == ["P1"] for m in ct.matches)
    march = search_studies(archive, {"StudyDate": ["20200301-20200331"], "limit": ["1000"]})
    assert march.matches and all(m["00080020"]["Value"][0].startswith("202003") for m in march.matches)
    named = search_studies(archive, {"00100010": ["name1?^*"], "fuzzymatching": ["true"]})
    assert sorted(m["00100010"]["Value"][0]["Alphabetic"] for m in named.matches) == \
        [f"Name{i}^Given" for i in range(10, 20)]
    assert named.warnings == [FUZZY_IGNORED]
    for pattern in ("äneas*", "ÄNEAS^RÜDIGER", "?neas^r?diger"):  # non-ASCII letters in any case, on both backends
        assert _uids(search_studies(archive, {"PatientName": [pattern]}).matches) == ["2.25.0"], pattern
    assert search_series(archive, "2.25.3", {}).matches[0]["0020000E"]["Value"] == ["2.25.3.1"]
    with pytest.raises(NotFoundError):
        search_series(archive, "2.25.999999", {})
    for bad in ({"StudyDate": ["2020-01-01"]}, {"limit": ["-1"]}, {"includederived": ["maybe"]}):
        with pytest.raises(ArchiveError):
            search_studies(archive, bad)


def test_the_access_log_gets_names_never_values() -> None:
    params = {"00100010": ["Doe^John"], "PatientID": ["123"], "limit": ["5"], "Nonsense": ["x"]}
    assert query_attribute_names(params) == ["Nonsense", "PatientID", "PatientName", "limit"]
