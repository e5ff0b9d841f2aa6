"""Use cases: correct patient, study and series attributes of archived headers, merge patients, show the history.

A wrong Patient ID or name from the modality is routine. A correction rewrites
the header blob of every instance filed under the study (recorded conflicts
included, so ``get --include-conflicts`` serves consistent headers), keeps the
header each instance had before as a :class:`HeaderRevision` (revision 1 is the
header as received), updates the catalog's study and series columns, and adds
one audit row — all in one transaction. Pixel data and UIDs never change: only
the header blob is rewritten (for an object kept whole, the whole file with the
changed elements, its Pixel Data bytes untouched).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value
from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from archive.catalog.models import AuditEvent, HeaderRevision, Instance, Series, Study
from archive.dicom.uids import uid_text
from archive.dicom.writer import read_header, serialize_header
from archive.errors import ArchiveError, NotFoundError
from archive.kinds import AuditAction, StorageMode
from archive.services.audit import record
from archive.services.blobs import read_blobs, record_blobs
from archive.services.header_dictionaries import header_key
from archive.services.runtime import Archive
from archive.services.totals import refresh_totals
from archive.services.unit_of_work import UnitOfWork
from archive.store import BlobRef
from archive.store.compression import compress_bytes

#: What a correction may change, by level. Everything else is refused with the reason.
PATIENT_KEYWORDS = (
    "PatientID", "PatientName", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "PatientAge", "PatientWeight", "PatientSize", "PatientBirthName",
    "PatientMotherBirthName", "PatientComments", "EthnicGroup",
)
STUDY_KEYWORDS = (
    "AccessionNumber", "StudyDescription", "StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName",
    "InstitutionName", "InstitutionalDepartmentName", "RequestingPhysician", "AdmittingDiagnosesDescription",
)
SERIES_KEYWORDS = (
    "SeriesDescription", "BodyPartExamined", "SeriesNumber", "ProtocolName", "Laterality", "SeriesDate",
    "SeriesTime", "PerformingPhysicianName", "OperatorsName",
)
_STUDY_COLUMNS = {"PatientID": "patient_id", "PatientName": "patient_name", "StudyDate": "study_date",
                  "StudyTime": "study_time", "AccessionNumber": "accession_number",
                  "StudyDescription": "study_description"}
_SERIES_COLUMNS = {"SeriesDescription": "series_description", "BodyPartExamined": "body_part",
                   "SeriesNumber": "series_number"}
_ENUMERATED = {"PatientSex": ("M", "F", "O")}  # PS3.3 C.7.1.1
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
_ASCII_ONLY_CHARSETS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
_PAGE = 200  # instances read, rewritten and written per round (bounds memory for big studies)
_MAX_SHOWN = 20  # distinct previous values kept per keyword in reports and audit details


@dataclass
class KeywordChange:
    """One attribute across the affected instances: its new value and the values it replaced."""

    keyword: str
    new: str  # "" clears the value
    previous: dict[str, int] = field(default_factory=dict)  # previous value ("" absent or empty) -> instances

    def as_dict(self) -> dict[str, Any]:
        shown = sorted(self.previous.items(), key=lambda item: (-item[1], item[0]))[:_MAX_SHOWN]
        return {"keyword": self.keyword, "new": self.new, "instances": sum(self.previous.values()),
                "previous": [{"value": value, "instances": count} for value, count in shown]}


@dataclass
class CorrectionReport:
    """What a correction changed (or, dry run, would change)."""

    action: str
    target: str
    reason: str
    dry_run: bool
    studies: list[str] = field(default_factory=list)
    series_uid: str | None = None
    instances: int = 0  # instances whose header changed
    unchanged: int = 0  # instances that already had every value
    changes: dict[str, KeywordChange] = field(default_factory=dict)
    audit_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "target": self.target, "reason": self.reason, "dry_run": self.dry_run,
                "studies": self.studies, "series_uid": self.series_uid, "instances": self.instances,
                "unchanged": self.unchanged, "audit_id": self.audit_id,
                "changes": [change.as_dict() for change in self.changes.values()]}


def parse_assignments(items: Sequence[str], *, series_level: bool = False) -> dict[str, str]:
    """``Keyword=value`` strings (``Keyword=`` clears) checked against what may change and the keyword's VR.

    Patient and study attributes apply to a whole study; series attributes
    need a series (``series_level``). UIDs, the pixel module, file meta and
    unknown keywords are refused, and so is a value its VR does not allow.
    """
    if not items:
        raise ArchiveError("nothing to change: give at least one --set Keyword=value")
    values: dict[str, str] = {}
    for item in items:
        keyword, sep, value = item.partition("=")
        keyword = keyword.strip()
        if not sep or not keyword:
            raise ArchiveError(f"--set {item!r}: expected Keyword=value (Keyword= clears the value)")
        check_keyword(keyword, series_level=series_level)
        if keyword in values:
            raise ArchiveError(f"--set {keyword} given twice")
        check_value(keyword, value)
        values[keyword] = value
    return values


def check_keyword(keyword: str, *, series_level: bool) -> None:
    """Raise ArchiveError naming why ``keyword`` cannot be corrected here."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ArchiveError(f"unknown DICOM keyword {keyword!r} (keywords are case-sensitive, e.g. PatientID)")
    group = tag >> 16
    if group == 0x0002:
        raise ArchiveError(f"{keyword} is file meta information: it is written on retrieval, not corrected")
    if dictionary_VR(tag) == "UI":
        raise ArchiveError(f"{keyword} is a UID: UIDs never change in the archive")
    if group in (0x0028, 0x7FE0):
        raise ArchiveError(f"{keyword} describes the stored pixels (group {group:04X}): pixel data never changes")
    if keyword in SERIES_KEYWORDS:
        if not series_level:
            raise ArchiveError(f"{keyword} is a series attribute: give --series SERIES_UID")
        return
    if keyword in PATIENT_KEYWORDS or keyword in STUDY_KEYWORDS:
        if series_level:
            raise ArchiveError(f"{keyword} is a patient or study attribute and applies to the whole study: "
                               "run without --series")
        return
    allowed = ", ".join(PATIENT_KEYWORDS + STUDY_KEYWORDS + SERIES_KEYWORDS)
    raise ArchiveError(f"{keyword} is not an attribute medarchive corrects; allowed: {allowed}")


def check_value(keyword: str, value: str) -> None:
    """The value must be valid for the keyword's VR and multiplicity (pydicom's validation)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    vr, vm = dictionary_VR(tag), dictionary_VM(tag)
    parts = value.split("\\")
    if len(parts) > 1 and vm == "1":
        raise ArchiveError(f"{keyword}={value!r}: {keyword} takes one value, a backslash separates several")
    for part in parts:
        try:
            validate_value(vr, part, pydicom_config.RAISE)
        except ValueError as exc:
            detail = str(exc).split(" Please see")[0]
            raise ArchiveError(f"{keyword}={value!r}: not a valid {vr} value: {detail}") from exc
    allowed = _ENUMERATED.get(keyword)
    if allowed and value and value not in allowed:
        raise ArchiveError(f"{keyword}={value!r}: must be one of {', '.join(allowed)} (or empty)")


def update_attributes(
    archive: Archive, study_uid: str | None, values: Mapping[str, str], *, reason: str,
    series_uid: str | None = None, dry_run: bool = False,
) -> CorrectionReport:
    """Correct attributes of every instance of a study (or, with ``series_uid``, of one series).

    ``values`` as :func:`parse_assignments` returns them (checked again here).
    Raises NotFoundError for an unknown study or series.
    """
    reason = _reason(reason)
    for keyword, value in values.items():
        check_keyword(keyword, series_level=series_uid is not None)
        check_value(keyword, value)
    if not values:
        raise ArchiveError("nothing to change: give at least one --set Keyword=value")
    return _retrying(lambda: _update_once(archive, study_uid, values, reason, series_uid, dry_run))


def _update_once(archive: Archive, study_uid: str | None, values: Mapping[str, str], reason: str,
                 series_uid: str | None, dry_run: bool) -> CorrectionReport:
    with archive.unit_of_work() as uow:
        session = uow.session
        if series_uid is not None:
            series = session.scalar(select(Series).where(Series.series_uid == series_uid))
            if series is None:
                raise NotFoundError(f"no series with Series Instance UID {series_uid!r}")
            study = session.get(Study, series.study_id)
            assert study is not None
            if study_uid is not None and study.study_uid != study_uid:
                raise ArchiveError(f"series {series_uid} belongs to study {study.study_uid}, not {study_uid}")
            series_ids = [series.id]
        else:
            if study_uid is None:
                raise ArchiveError("give a Study Instance UID or --series SERIES_UID")
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                raise NotFoundError(f"no study with Study Instance UID {study_uid!r}")
            series_ids = list(session.scalars(select(Series.id).where(Series.study_id == study.id)))
        report = CorrectionReport(AuditAction.UPDATE.value, series_uid or study.study_uid, reason, dry_run,
                                  studies=[study.study_uid], series_uid=series_uid)
        _correct(archive, uow, series_ids, dict(values), report, AuditAction.UPDATE)
        if not dry_run:
            _update_columns(session, [study.id], series_ids if series_uid else [], values)
            uow.commit()
    return report


def merge_patient(
    archive: Archive, old_id: str, new_id: str, *, reason: str, name: str | None = None, dry_run: bool = False,
) -> CorrectionReport:
    """Every study whose Patient ID is ``old_id`` gets ``new_id`` (and ``name`` when given), in one transaction."""
    reason = _reason(reason)
    if old_id == new_id:
        raise ArchiveError(f"the old and the new Patient ID are the same ({old_id!r})")
    values = {"PatientID": new_id}
    if name is not None:
        values["PatientName"] = name
    for keyword, value in values.items():
        check_value(keyword, value)
    if not new_id.strip():
        raise ArchiveError("the new Patient ID is empty")
    return _retrying(lambda: _merge_once(archive, old_id, new_id, values, reason, dry_run))


def _merge_once(archive: Archive, old_id: str, new_id: str, values: dict[str, str], reason: str,
                dry_run: bool) -> CorrectionReport:
    with archive.unit_of_work() as uow:
        session = uow.session
        studies = session.execute(select(Study.id, Study.study_uid).where(Study.patient_id == old_id)
                                  .order_by(Study.id)).all()
        if not studies:
            raise NotFoundError(f"no study with Patient ID {old_id!r}")
        study_ids = [row.id for row in studies]
        series_ids = list(session.scalars(select(Series.id).where(Series.study_id.in_(study_ids))))
        report = CorrectionReport(AuditAction.MERGE_PATIENT.value, old_id, reason, dry_run,
                                  studies=[row.study_uid for row in studies])
        _correct(archive, uow, series_ids, values, report, AuditAction.MERGE_PATIENT,
                 extra={"old_patient_id": old_id, "new_patient_id": new_id})
        if not dry_run:
            _update_columns(session, study_ids, [], values)
            uow.commit()
    return report


def _reason(reason: str | None) -> str:
    if reason is None or not reason.strip():
        raise ArchiveError("a --reason is required: the audit log says why data was changed")
    return reason.strip()


class _ChangedMeanwhile(Exception):
    """Another correction rewrote some of these headers after they were read: start again from the new ones."""


def _retrying(attempt: Callable[[], CorrectionReport], tries: int = 5) -> CorrectionReport:
    """Corrections of the same instances at once apply one after the other, each on the other's result."""
    for _ in range(tries):
        try:
            return attempt()
        except _ChangedMeanwhile:  # the blobs written meanwhile are left to the GC
            continue
        except OperationalError as exc:  # PostgreSQL chose this transaction to break a deadlock: run it again
            if getattr(exc.orig, "sqlstate", None) not in ("40001", "40P01"):
                raise
    raise ArchiveError(f"other corrections kept changing these instances ({tries} tries); nothing was changed: "
                       "run the command again")


def _correct(archive: Archive, uow: UnitOfWork, series_ids: Sequence[int], values: dict[str, str],
             report: CorrectionReport, action: AuditAction, extra: Mapping[str, Any] | None = None) -> None:
    """Rewrite the header of every instance in ``series_ids`` that differs; fill ``report``.

    One query for the instances, one for their header blobs' locations per page,
    blobs written and made durable, then the catalog rows in bulk (no commit here).
    """
    session = uow.session
    rows = session.execute(
        select(Instance.id, Instance.sop_instance_uid, Instance.storage_mode, Instance.header_blob,
               Instance.header_dictionary, Instance.header_sha256)
        .where(Instance.series_id.in_(series_ids)).order_by(Instance.id)
    ).all() if series_ids else []
    report.changes = {keyword: KeywordChange(keyword, value) for keyword, value in values.items()}
    rewritten: list[_Rewritten] = []
    for page in _pages(rows):
        digests = [row.header_blob for row in page]
        for row, data in zip(page, read_blobs(session, uow.store, digests)):
            result = _rewrite(archive, session, row, data, values, report, dry_run=report.dry_run)
            if result is None:
                report.unchanged += 1
            else:
                rewritten.append(result)
    report.instances = len(rewritten)
    if report.dry_run or not rewritten:
        return
    refs = [item.ref for item in rewritten]
    archive.store.make_durable(refs)  # durable before the rows that reference them commit
    record_blobs(session, refs)
    # compare-and-set: the header each row had when it was read, else another correction came first
    swapped = session.connection().execute(
        update(Instance).where(Instance.id == bindparam("b_id"), Instance.header_blob == bindparam("b_old"))
        .values(header_blob=bindparam("b_blob"), header_dictionary=bindparam("b_dictionary"),
                header_sha256=bindparam("b_sha256")),
        [{"b_id": item.instance_id, "b_old": item.old_blob, "b_blob": item.ref.digest,
          "b_dictionary": item.dictionary, "b_sha256": item.header_sha256} for item in rewritten],
    )
    if swapped.rowcount != len(rewritten):
        raise _ChangedMeanwhile()
    details: dict[str, Any] = {"studies": report.studies, "instances": report.instances,
                               "changes": {k: c.as_dict() for k, c in report.changes.items() if c.previous}}
    if report.series_uid:
        details["series_uid"] = report.series_uid
    details.update(extra or {})
    event = record(session, action, report.target, reason=report.reason, details=details)
    report.audit_id = event.id
    latest = _latest_revisions(session, [item.instance_id for item in rewritten])
    session.execute(insert(HeaderRevision), [
        {"instance_id": item.instance_id, "revision": latest.get(item.instance_id, 0) + 1,
         "header_blob": item.old_blob, "header_dictionary": item.old_dictionary, "header_sha256": item.old_sha256,
         "changes": item.changes, "audit_id": event.id}
        for item in rewritten
    ])


@dataclass
class _Rewritten:
    instance_id: int
    old_blob: str
    old_dictionary: str | None
    old_sha256: str
    changes: dict[str, list[str | None]]
    ref: BlobRef
    dictionary: str | None
    header_sha256: str


def _pages(rows: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), _PAGE):
        yield rows[start:start + _PAGE]


def _rewrite(archive: Archive, session: Session, row: Any, data: bytes, values: Mapping[str, str],
             report: CorrectionReport, *, dry_run: bool) -> _Rewritten | None:
    """One instance's corrected header blob (written unless ``dry_run``), or None when nothing differs."""
    part10 = archive.headers.decompress(session, data, row.header_dictionary)
    ds = read_header(part10)
    changes: dict[str, list[str | None]] = {}
    for keyword, value in values.items():
        old = uid_text(ds, keyword)
        if (old or "") == value:
            continue
        _check_encodable(ds, keyword, value, row.sop_instance_uid)
        changes[keyword] = [old, value]
        counts = report.changes[keyword].previous
        counts[old or ""] = counts.get(old or "", 0) + 1
        _set(ds, keyword, value)
    if not changes:
        return None
    if dry_run:
        return _Rewritten(row.id, row.header_blob, row.header_dictionary, row.header_sha256, changes,
                          BlobRef("", 0), None, "")
    header = serialize_header(ds)  # the data set's identity, as staging computes it for a re-serialised header
    if row.storage_mode is StorageMode.WHOLE:  # the blob is the whole object: written back in its own encoding
        blob, dictionary = compress_bytes(_whole_file(ds), archive.settings.header_zstd_level), None
    else:
        key = header_key(uid_text(ds, "Modality"), uid_text(ds, "Manufacturer"))
        blob, dictionary = archive.headers.compress(key, header.part10, session)
    ref = archive.store.put(blob)
    return _Rewritten(row.id, row.header_blob, row.header_dictionary, row.header_sha256, changes, ref, dictionary,
                      header.dataset_sha256)


def _set(ds: Dataset, keyword: str, value: str) -> None:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    parts = value.split("\\")
    ds[tag] = DataElement(tag, dictionary_VR(tag), parts if len(parts) > 1 else value)


def _check_encodable(ds: Dataset, keyword: str, value: str, sop_instance_uid: str) -> None:
    """A value the header's Specific Character Set cannot represent would be written as replacement characters."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    if value.isascii() or dictionary_VR(tag) not in _TEXT_VRS:
        return
    charsets = ds.get("SpecificCharacterSet") or ""
    names = [str(c) for c in charsets] if isinstance(charsets, (list, tuple, MultiValue)) else [str(charsets)]
    if all(name.strip() in _ASCII_ONLY_CHARSETS for name in names):
        raise ArchiveError(f"{keyword}={value!r}: instance {sop_instance_uid} has no Specific Character Set beyond "
                           "ASCII, so this value cannot be written faithfully")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            encode_string(value, convert_encodings(names))
        except (UserWarning, LookupError, ValueError) as exc:
            charset = "\\".join(names)
            raise ArchiveError(f"{keyword}={value!r}: not representable in the Specific Character Set "
                               f"{charset} of instance {sop_instance_uid}") from exc


def _whole_file(ds: Dataset) -> bytes:
    """A whole-kept object written back as it was read: same preamble, file meta and encoding."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values are kept as received, valid or not
        pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
    return buffer.getvalue()


def _latest_revisions(session: Session, instance_ids: Sequence[int]) -> dict[int, int]:
    latest: dict[int, int] = {}
    ids = sorted(instance_ids)
    for start in range(0, len(ids), 500):
        for instance_id, revision in session.execute(
            select(HeaderRevision.instance_id, func.max(HeaderRevision.revision))
            .where(HeaderRevision.instance_id.in_(ids[start:start + 500])).group_by(HeaderRevision.instance_id)
        ):
            latest[instance_id] = int(revision)
    return latest


def _update_columns(session: Session, study_ids: Sequence[int], series_ids: Sequence[int],
                    values: Mapping[str, str]) -> None:
    """The catalog's copies of the corrected attributes (what ``studies`` lists and filters on), and the totals."""
    study_values = {_STUDY_COLUMNS[k]: _column_value(k, v) for k, v in values.items() if k in _STUDY_COLUMNS}
    if study_values and study_ids:
        session.execute(update(Study).where(Study.id.in_(study_ids)).values(**study_values)
                        .execution_options(synchronize_session=False))
    series_values = {_SERIES_COLUMNS[k]: _column_value(k, v) for k, v in values.items() if k in _SERIES_COLUMNS}
    if series_values and series_ids:
        session.execute(update(Series).where(Series.id.in_(series_ids)).values(**series_values)
                        .execution_options(synchronize_session=False))
    refresh_totals(session, study_ids)  # header blobs changed size


def _column_value(keyword: str, value: str) -> str | int | None:
    if not value:
        return None
    if keyword == "SeriesNumber":
        return int(value)
    if keyword == "StudyDate":
        return value[:8]
    if keyword == "StudyDescription" or keyword == "SeriesDescription":
        return value[:256]
    return value


# --- history ---------------------------------------------------------------------------------------------


def study_history(archive: Archive, study_uid: str) -> dict[str, Any]:
    """The corrections of a study: audit entries (who, when, why, what) and every kept header revision."""
    with archive.unit_of_work() as uow:
        session = uow.session
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise NotFoundError(f"no study with Study Instance UID {study_uid!r}")
        series_uids = list(session.scalars(select(Series.series_uid).where(Series.study_id == study.id)))
        revisions = session.execute(
            select(HeaderRevision, Instance.sop_instance_uid, Instance.conflict_seq, Series.series_uid)
            .join(Instance, HeaderRevision.instance_id == Instance.id).join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study.id)
            .order_by(HeaderRevision.audit_id, Instance.id, HeaderRevision.revision)
        ).all()
        audit_ids = {rev.audit_id for rev, *_ in revisions if rev.audit_id is not None}
        events = session.scalars(
            select(AuditEvent).where(or_(AuditEvent.id.in_(sorted(audit_ids)),
                                         AuditEvent.target.in_([study_uid, *series_uids])))
            .order_by(AuditEvent.created_at, AuditEvent.id)
        ).all()
        per_event: dict[int, list[Any]] = {}
        for rev, *_ in revisions:
            if rev.audit_id is not None:
                per_event.setdefault(rev.audit_id, []).append(rev)
        return {
            "study_uid": study_uid,
            "patient_id": study.patient_id,
            "patient_name": study.patient_name,
            "events": [_event_dict(event, per_event.get(event.id, [])) for event in events],
            "revisions": [
                {"sop_instance_uid": sop, "conflict_seq": seq, "series_uid": series, "revision": rev.revision,
                 "header_blob": rev.header_blob, "header_dictionary": rev.header_dictionary,
                 "header_sha256": rev.header_sha256, "changes": rev.changes, "audit_id": rev.audit_id,
                 "created_at": rev.created_at.isoformat()}
                for rev, sop, seq, series in revisions
            ],
        }


def _event_dict(event: AuditEvent, revisions: Sequence[HeaderRevision]) -> dict[str, Any]:
    changed: dict[str, dict[str, Any]] = {}
    for rev in revisions:
        for keyword, (old, new) in rev.changes.items():
            entry = changed.setdefault(keyword, {"new": new, "previous": set()})
            entry["previous"].add(old or "")
    return {
        "id": event.id, "action": event.action.value, "target": event.target, "actor": event.actor,
        "reason": event.reason, "created_at": event.created_at.isoformat(), "instances": len(revisions),
        "revisions": sorted({rev.revision for rev in revisions}),
        "changes": {k: {"new": v["new"], "previous": sorted(v["previous"])[:_MAX_SHOWN]} for k, v in changed.items()},
        "details": event.details,
    }


def revision_header(archive: Archive, sop_instance_uid: str, revision: int, *, conflict_seq: int = 0) -> bytes:
    """A header an instance had before a correction, as a Part 10 file without Pixel Data (the whole object
    for one kept whole)."""
    with archive.unit_of_work() as uow:
        row = uow.session.execute(
            select(HeaderRevision.header_blob, HeaderRevision.header_dictionary)
            .join(Instance, HeaderRevision.instance_id == Instance.id)
            .where(Instance.sop_instance_uid == sop_instance_uid, Instance.conflict_seq == conflict_seq,
                   HeaderRevision.revision == revision)
        ).one_or_none()
        if row is None:
            raise NotFoundError(f"instance {sop_instance_uid} has no header revision {revision}")
        return uow.read_header(row.header_blob, row.header_dictionary)
