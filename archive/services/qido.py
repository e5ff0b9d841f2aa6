"""QIDO-RS (PS3.18 10.6): search the catalog for studies, series and instances, answered as DICOM JSON (PS3.18 F.2).

Matching and the default return attributes come from catalog columns, so a
study search is one SQL query (``limit``/``offset`` in it, no per-study
look-ups). Other attributes named by ``includefield`` are read from one
representative header per answer row (the first instance of the study or
series), and only when asked for.

Choices the standard leaves to the server, and medarchive's own parameter:

- ``limit`` defaults to :data:`DEFAULT_LIMIT` and is capped at :data:`MAX_LIMIT`
  (:data:`MAX_HEADER_LIMIT` when headers must be read); a result cut by the
  server, not the client, carries the 299 warning PS3.18 10.6.3.2 prescribes.
- ``PatientName``, ``ReferringPhysicianName`` and the descriptions match
  whatever the case (as Orthanc does), non-ASCII letters included; IDs,
  accession numbers and UIDs exactly; ``*`` and ``?`` are wildcards.
- ``fuzzymatching=true`` and matching keys medarchive cannot match are ignored,
  each with a 299 warning that names it.
- Derived series (normalized and lossy representations, new UIDs made by
  medarchive) are left out, and not counted, unless ``includederived=true``;
  a derived series named in the URL path is listed anyway. Included, a
  derived series answers its header's ImageType (``DERIVED\\SECONDARY``).
- Conflicting objects (a second, different object with a known SOP Instance
  UID) are never listed; an original held only as its lossy derivative
  (status ``lossy-only``) is listed: the instance exists.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, and_, exists, func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from archive.catalog.models import Instance, Series, Study
from archive.dicom.writer import read_header
from archive.errors import ArchiveError, NotFoundError
from archive.services.query import _matches, parse_date_range, wildcard_to_like
from archive.services.runtime import Archive
from archive.services.unit_of_work import UnitOfWork

_log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100  # as `medarchive studies` and Google Cloud Healthcare; a cut answer says so (299)
MAX_LIMIT = 5000
MAX_HEADER_LIMIT = 1000  # rows whose headers are read (includefield beyond the catalog) per request
INLINE_BINARY_MAX = 1024  # includefield=all: binary elements up to this size are sent inline, bigger ones left out
TRUNCATED = "The number of results exceeded the maximum supported by the server. Additional results can be requested."
FUZZY_IGNORED = "fuzzymatching is not supported and was ignored"
_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no", ""})
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})


@dataclass
class QidoResult:
    matches: list[dict[str, Any]]  # DICOM JSON objects
    warnings: list[str]  # texts for 299 Warning headers


def search_studies(archive: Archive, params: Mapping[str, Sequence[str]], *, base_url: str = "") -> QidoResult:
    """``GET /studies``: studies matching ``params`` (query parameters, each with all its values)."""
    return _search(archive, _STUDY, params, base_url=base_url)


def search_series(archive: Archive, study_uid: str | None, params: Mapping[str, Sequence[str]], *,
                  base_url: str = "") -> QidoResult:
    """``GET /series`` or ``GET /studies/{study_uid}/series`` (an unknown study: :class:`NotFoundError`)."""
    return _search(archive, _SERIES, params, base_url=base_url, study_uid=study_uid)


def search_instances(archive: Archive, study_uid: str | None, series_uid: str | None,
                     params: Mapping[str, Sequence[str]], *, base_url: str = "") -> QidoResult:
    """``GET /instances``, ``/studies/{study}/instances`` or ``/studies/{study}/series/{series}/instances``."""
    return _search(archive, _INSTANCE, params, base_url=base_url, study_uid=study_uid, series_uid=series_uid)


def search_patients(archive: Archive, params: Mapping[str, Sequence[str]]) -> QidoResult:
    """Patients (one answer per Patient ID) with a study matching ``params``: the DIMSE C-FIND PATIENT level.

    QIDO-RS has no patient resource; the matching keys are those of the study level's patient attributes.
    The name, birth date and sex are the patient's newest study's; the counts cover all of the patient's studies.
    """
    request = _parse(_PATIENT, params)
    request.limit = min(request.limit, MAX_LIMIT)
    with archive.unit_of_work() as uow:
        dialect = uow.session.get_bind().dialect.name
        ctx = _Context("", request.include_derived, dialect)
        if dialect == "sqlite":
            _register_sqlite_lower(uow.session)
        rows = list(uow.session.execute(_patient_statement(request, ctx)).mappings())
    if len(rows) > request.limit:
        rows = rows[:request.limit]
        if request.client_limit is None or request.client_limit != request.limit:
            request.warnings.append(TRUNCATED)
    default = {a.tag for a in _PATIENT.attrs}
    plan = sorted((a for t, a in _PATIENT.catalog.items() if t in default or t in request.returned),
                  key=lambda a: a.tag)
    return QidoResult([_json_of(row, plan, ctx) for row in rows], request.warnings)


def query_attribute_names(params: Mapping[str, Sequence[str]]) -> list[str]:
    """The sorted NAMES of a query's parameters (keywords where a tag was given): what the access log records."""
    names = set()
    for key in params:
        tag = _tag_of(key)
        if tag is None:
            names.add(key[:40])
        else:
            names.add(keyword_for_tag(tag) or f"{tag:08X}")
    return sorted(names)


# --- attributes


@dataclass(frozen=True)
class _Context:
    base_url: str
    include_derived: bool
    dialect: str


_Getter = Callable[[RowMapping, _Context], Any]


@dataclass(frozen=True)
class _Attr:
    """A return attribute the catalog answers: its tag, VR, and the answer row's column or a function of the row."""

    tag: int
    vr: str
    column: str | None
    get: _Getter | None
    key: str  # the tag as DICOM JSON names it, "0020000D"
    kind: str  # how its value becomes JSON: "str" (backslash-separated values), "text", "int", "float", "pn"


def _col(name: str) -> str:
    return name


def _study_url(row: RowMapping, ctx: _Context) -> str:
    return f"{ctx.base_url}/studies/{row['study_uid']}"


def _series_url(row: RowMapping, ctx: _Context) -> str:
    return f"{_study_url(row, ctx)}/series/{row['series_uid']}"


def _instance_url(row: RowMapping, ctx: _Context) -> str:
    return f"{_series_url(row, ctx)}/instances/{row['sop_instance_uid']}"


def _study_series(row: RowMapping, ctx: _Context) -> int:
    return int(row["study_num_series"]) + (int(row["study_num_derived_series"]) if ctx.include_derived else 0)


def _study_instances(row: RowMapping, ctx: _Context) -> int:
    return int(row["study_num_instances"]) + (int(row["study_num_derived_instances"]) if ctx.include_derived else 0)


def _attr(keyword: str, source: str | _Getter) -> _Attr:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag)
    kind = ("pn" if vr == "PN" else "text" if vr in ("LT", "ST", "UT", "UR") else "float" if vr in ("DS", "FL", "FD")
            else "int" if vr in _NUMERIC_VRS else "str")
    if isinstance(source, str):
        return _Attr(tag, vr, source, None, f"{tag:08X}", kind)
    return _Attr(tag, vr, None, source, f"{tag:08X}", kind)


_ONLINE: _Getter = lambda _row, _ctx: "ONLINE"  # noqa: E731
_UTF8: _Getter = lambda _row, _ctx: "ISO_IR 192"  # noqa: E731 (the JSON answer is UTF-8 whatever the source's set)

_STUDY_ATTRS = [
    _attr("SpecificCharacterSet", _UTF8), _attr("StudyDate", _col("study_date")),
    _attr("StudyTime", _col("study_time")), _attr("AccessionNumber", _col("accession_number")),
    _attr("InstanceAvailability", _ONLINE), _attr("ModalitiesInStudy", _col("modalities_in_study")),
    _attr("ReferringPhysicianName", _col("referring_physician_name")), _attr("RetrieveURL", _study_url),
    _attr("PatientName", _col("patient_name")), _attr("PatientID", _col("patient_id")),
    _attr("PatientBirthDate", _col("patient_birth_date")), _attr("PatientSex", _col("patient_sex")),
    _attr("StudyInstanceUID", _col("study_uid")), _attr("StudyID", _col("dicom_study_id")),
    _attr("NumberOfStudyRelatedSeries", _study_series), _attr("NumberOfStudyRelatedInstances", _study_instances),
    _attr("StudyDescription", _col("study_description")),
]
_PATIENT_ATTRS = [
    _attr("SpecificCharacterSet", _UTF8), _attr("PatientName", _col("patient_name")),
    _attr("PatientID", _col("patient_id")), _attr("PatientBirthDate", _col("patient_birth_date")),
    _attr("PatientSex", _col("patient_sex")),
]
_PATIENT_EXTRA = [  # counted only when asked for
    _attr("NumberOfPatientRelatedStudies", _col("patient_num_studies")),
    _attr("NumberOfPatientRelatedSeries", _col("patient_num_series")),
    _attr("NumberOfPatientRelatedInstances", _col("patient_num_instances")),
]
_SERIES_ATTRS = [
    _attr("SpecificCharacterSet", _UTF8), _attr("Modality", _col("modality")),
    _attr("SeriesDescription", _col("series_description")), _attr("SeriesNumber", _col("series_number")),
    _attr("SeriesInstanceUID", _col("series_uid")),
    _attr("NumberOfSeriesRelatedInstances", _col("series_num_instances")), _attr("RetrieveURL", _series_url),
    _attr("StudyInstanceUID", _col("study_uid")),
]
_SERIES_EXTRA = [_attr("BodyPartExamined", _col("body_part"))]
_INSTANCE_ATTRS = [
    _attr("SpecificCharacterSet", _UTF8), _attr("SOPClassUID", _col("sop_class_uid")),
    _attr("SOPInstanceUID", _col("sop_instance_uid")), _attr("InstanceAvailability", _ONLINE),
    _attr("RetrieveURL", _instance_url), _attr("InstanceNumber", _col("instance_number")),
    _attr("Rows", _col("rows")), _attr("Columns", _col("columns")), _attr("BitsAllocated", _col("bits_allocated")),
    _attr("NumberOfFrames", _col("number_of_frames")), _attr("StudyInstanceUID", _col("study_uid")),
    _attr("SeriesInstanceUID", _col("series_uid")),
]
_INSTANCE_EXTRA = [
    _attr("BitsStored", _col("bits_stored")), _attr("HighBit", _col("high_bit")),
    _attr("PixelRepresentation", _col("pixel_representation")), _attr("SamplesPerPixel", _col("samples_per_pixel")),
    _attr("PhotometricInterpretation", _col("photometric_interpretation")),
]

# includefield=all at study and series level: the header attributes of that level (PS3.3 C.7.1.1, C.7.2.1-2,
# C.7.3.1, C.7.5.1); at instance level it is the whole header. Group 0010 (Patient) is added at study level.
_STUDY_ALL = ("IssuerOfPatientID", "OtherPatientIDs", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
              "AdditionalPatientHistory", "PatientComments", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
              "AdmittingDiagnosesDescription", "ProcedureCodeSequence", "StudyComments")
_SERIES_ALL = ("SeriesDate", "SeriesTime", "ImageType", "ProtocolName", "Laterality", "OperatorsName",
               "PerformingPhysicianName", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
               "PerformedProcedureStepID", "PerformedProcedureStepDescription", "PatientPosition", "Manufacturer",
               "InstitutionName", "StationName", "ManufacturerModelName", "SoftwareVersions",
               "DeviceSerialNumber", "FrameOfReferenceUID", "ContrastBolusAgent", "ScanningSequence",
               "SliceThickness")


# --- matching keys


_Condition = Callable[[str, _Context], ColumnElement[bool] | None]


def _text_key(column: InstrumentedAttribute[str | None], *, case_sensitive: bool) -> _Condition:
    def condition(value: str, ctx: _Context) -> ColumnElement[bool] | None:
        if value.strip("*") == "" and value:
            return None  # "*" matches everything, empty values included
        if not case_sensitive:
            return _matches_casefree(column, value, ctx.dialect)
        if "*" not in value and "?" not in value:
            return column == value  # an index look-up
        return _matches(column, value, case_sensitive=True, dialect=ctx.dialect)
    return condition


def _uid_key(column: InstrumentedAttribute[str] | InstrumentedAttribute[str | None]) -> _Condition:
    """UID list matching (PS3.4 C.2.2.2.2): one UID or several separated by commas or backslashes."""
    def condition(value: str, _ctx: _Context) -> ColumnElement[bool] | None:
        uids = [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]
        if not uids:
            return None  # only separators: no UID given, a universal match
        return column.in_(uids) if len(uids) > 1 else column == uids[0]
    return condition


def _date_key(column: InstrumentedAttribute[str | None], keyword: str) -> _Condition:
    def condition(value: str, _ctx: _Context) -> ColumnElement[bool] | None:
        try:
            start, end = parse_date_range(value)
        except ArchiveError as exc:
            raise ArchiveError(f"{keyword}={value!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD "
                               f"({str(exc).split(': ', 1)[-1]})") from None
        bounds = ([column >= start] if start else []) + ([column <= end] if end else [])
        return and_(*bounds)
    return condition


def _int_key(column: InstrumentedAttribute[int | None], keyword: str) -> _Condition:
    def condition(value: str, _ctx: _Context) -> ColumnElement[bool] | None:
        try:
            numbers = [int(v) for v in re.split(r"[,\\]", value) if v.strip()]
        except ValueError:
            raise ArchiveError(f"{keyword}={value!r}: give an integer (or several, comma separated)") from None
        if not numbers:
            return None
        return column.in_(numbers) if len(numbers) > 1 else column == numbers[0]
    return condition


def _code_key(column: InstrumentedAttribute[str | None]) -> _Condition:
    """A code string (Modality): any of the listed values, whatever the case."""
    def condition(value: str, _ctx: _Context) -> ColumnElement[bool] | None:
        codes = [c.strip().upper() for c in re.split(r"[,\\]", value) if c.strip()]
        return func.upper(column).in_(codes)
    return condition


def _modalities_in_study(value: str, ctx: _Context) -> ColumnElement[bool] | None:
    """A study matches when one of its series (an original one unless derived ones are included) has a listed modality."""
    codes = [c.strip().upper() for c in re.split(r"[,\\]", value) if c.strip()]
    if not codes:
        return None
    other = aliased(Series)  # at series and instance level the outer query has Series too: no auto-correlation
    where = [other.study_id == Study.id, func.upper(other.modality).in_(codes)]
    if not ctx.include_derived:
        where.append(other.derived_from_id.is_(None))
    return exists().where(*where)


def _key(keyword: str, condition: _Condition) -> tuple[int, _Condition]:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag, condition


_STUDY_KEYS = dict([
    _key("PatientID", _text_key(Study.patient_id, case_sensitive=True)),
    _key("PatientName", _text_key(Study.patient_name, case_sensitive=False)),
    _key("AccessionNumber", _text_key(Study.accession_number, case_sensitive=True)),
    _key("StudyDescription", _text_key(Study.study_description, case_sensitive=False)),
    _key("ReferringPhysicianName", _text_key(Study.referring_physician_name, case_sensitive=False)),
    _key("StudyID", _text_key(Study.dicom_study_id, case_sensitive=True)),
    _key("PatientSex", _code_key(Study.patient_sex)),
    _key("StudyDate", _date_key(Study.study_date, "StudyDate")),
    _key("PatientBirthDate", _date_key(Study.patient_birth_date, "PatientBirthDate")),
    _key("StudyInstanceUID", _uid_key(Study.study_uid)),
    _key("ModalitiesInStudy", _modalities_in_study),
])
_SERIES_KEYS = dict([
    _key("Modality", _code_key(Series.modality)),
    _key("SeriesInstanceUID", _uid_key(Series.series_uid)),
    _key("SeriesNumber", _int_key(Series.series_number, "SeriesNumber")),
    _key("SeriesDescription", _text_key(Series.series_description, case_sensitive=False)),
])
_INSTANCE_KEYS = dict([
    _key("SOPInstanceUID", _uid_key(Instance.sop_instance_uid)),
    _key("SOPClassUID", _uid_key(Instance.sop_class_uid)),
    _key("InstanceNumber", _int_key(Instance.instance_number, "InstanceNumber")),
])


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _matches_casefree(column: InstrumentedAttribute[str | None], pattern: str, dialect: str) -> ColumnElement[bool]:
    """Case-insensitive wildcard match; on SQLite, whose lower() knows only ASCII, through Python's for non-ASCII."""
    if dialect == "sqlite" and not pattern.isascii():
        return func.medarchive_lower(column).like(wildcard_to_like(pattern).lower(), escape="\\")
    return _matches(column, pattern, case_sensitive=False, dialect=dialect)


def _register_sqlite_lower(session: Session) -> None:
    """SQLite's lower() leaves É as it is: give this connection a Unicode one (a cheap C call, idempotent)."""
    raw: Any = session.connection().connection.dbapi_connection
    raw.create_function("medarchive_lower", 1, _lower, deterministic=True)


# --- the query


@dataclass(frozen=True)
class _Level:
    name: str
    attrs: list[_Attr]  # returned by default
    catalog: dict[int, _Attr]  # every attribute the catalog answers at this level (the levels above included)
    keys: dict[int, _Condition]  # matching keys of this level and the levels above
    header_all: tuple[str, ...]


def _level(name: str, attrs: list[_Attr], extra: list[_Attr], keys: dict[int, _Condition],
           header_all: tuple[str, ...]) -> _Level:
    catalog: dict[int, _Attr] = {}
    for attr in attrs + extra:  # the first of a tag wins: an instance's RetrieveURL is the instance's
        catalog.setdefault(attr.tag, attr)
    return _Level(name, attrs, catalog, keys, header_all)


_PATIENT_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
_PATIENT = _level("patient", _PATIENT_ATTRS, _PATIENT_EXTRA,
                  {t: c for t, c in _STUDY_KEYS.items() if keyword_for_tag(t) in _PATIENT_KEYWORDS}, ())
_STUDY = _level("study", _STUDY_ATTRS, [], _STUDY_KEYS, _STUDY_ALL)
_SERIES = _level("series", _SERIES_ATTRS, _SERIES_EXTRA + _STUDY_ATTRS, {**_STUDY_KEYS, **_SERIES_KEYS}, _SERIES_ALL)
_INSTANCE = _level("instance", _INSTANCE_ATTRS, _INSTANCE_EXTRA + _SERIES_ATTRS + _SERIES_EXTRA + _STUDY_ATTRS,
                   {**_STUDY_KEYS, **_SERIES_KEYS, **_INSTANCE_KEYS}, ())
_UTF8_TAG = 0x00080005


@dataclass
class _Request:
    """A query's parameters, parsed once."""

    conditions: list[tuple[int, str]] = field(default_factory=list)  # (tag, value) of matching keys with a value
    returned: set[int] = field(default_factory=set)  # matching keys and includefield tags: returned as well
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    client_limit: int | None = None
    offset: int = 0
    include_derived: bool = False
    warnings: list[str] = field(default_factory=list)


def _tag_of(name: str) -> int | None:
    """A keyword (``PatientName``) or a tag (``00100010``) as a tag; None when it is neither."""
    name = name.strip()
    if _HEX_TAG.match(name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    return int(tag) if tag is not None else None


def _integer(name: str, values: Sequence[str]) -> int:
    try:
        number = int(values[-1])
    except ValueError:
        raise ArchiveError(f"{name}={values[-1]!r}: give a whole number") from None
    if number < 0:
        raise ArchiveError(f"{name}={number}: give a number >= 0")
    return number


def _flag(name: str, values: Sequence[str]) -> bool:
    value = values[-1].strip().lower()
    if value not in _TRUE | _FALSE:
        raise ArchiveError(f"{name}={values[-1]!r}: give true or false")
    return value in _TRUE


def _parse(level: _Level, params: Mapping[str, Sequence[str]]) -> _Request:
    request = _Request()
    ignored: list[str] = []
    unknown_fields: list[str] = []
    for name, values in params.items():
        if not values:
            continue
        if name == "includefield":
            for item in (v.strip() for value in values for v in value.split(",")):
                if item.lower() == "all":
                    request.include_all = True
                elif item:
                    tag = _tag_of(item)
                    if tag is None:
                        unknown_fields.append(item[:64])
                    else:
                        request.returned.add(tag)
        elif name == "limit":
            request.client_limit = _integer(name, values)
        elif name == "offset":
            request.offset = _integer(name, values)
        elif name == "fuzzymatching":
            if _flag(name, values):
                request.warnings.append(FUZZY_IGNORED)
        elif name == "includederived":
            request.include_derived = _flag(name, values)
        else:
            tag = _tag_of(name)
            if tag is None or tag not in level.keys:
                ignored.append(name[:64] if tag is None else keyword_for_tag(tag) or f"{tag:08X}")
                continue
            request.returned.add(tag)
            for value in values:
                if value.strip():
                    request.conditions.append((tag, value.strip()))
    if ignored:
        request.warnings.append(f"matching not supported at {level.name} level, ignored: {', '.join(sorted(ignored))}")
    if unknown_fields:
        request.warnings.append(f"includefield names no attribute, ignored: {', '.join(sorted(unknown_fields))}")
    if request.client_limit is not None:
        request.limit = max(1, request.client_limit) if request.client_limit else DEFAULT_LIMIT
    return request


_STUDY_COLUMNS = {
    "study_pk": Study.id, "study_uid": Study.study_uid, "patient_id": Study.patient_id,
    "patient_name": Study.patient_name, "study_date": Study.study_date, "study_time": Study.study_time,
    "accession_number": Study.accession_number, "study_description": Study.study_description,
    "modalities_in_study": Study.modalities_in_study, "patient_birth_date": Study.patient_birth_date,
    "patient_sex": Study.patient_sex, "referring_physician_name": Study.referring_physician_name,
    "dicom_study_id": Study.dicom_study_id, "study_num_series": Study.num_series,
    "study_num_instances": Study.num_instances, "study_num_derived_series": Study.num_derived_series,
    "study_num_derived_instances": Study.num_derived_instances,
}
_SERIES_COLUMNS = {
    "series_pk": Series.id, "series_uid": Series.series_uid, "modality": Series.modality,
    "series_number": Series.series_number, "series_description": Series.series_description,
    "body_part": Series.body_part, "series_num_instances": Series.num_instances,
    "derived_from_id": Series.derived_from_id,
}
_INSTANCE_COLUMNS = {
    "instance_pk": Instance.id, "sop_instance_uid": Instance.sop_instance_uid, "sop_class_uid": Instance.sop_class_uid,
    "instance_number": Instance.instance_number, "rows": Instance.rows, "columns": Instance.columns,
    "bits_allocated": Instance.bits_allocated, "bits_stored": Instance.bits_stored, "high_bit": Instance.high_bit,
    "pixel_representation": Instance.pixel_representation, "samples_per_pixel": Instance.samples_per_pixel,
    "photometric_interpretation": Instance.photometric_interpretation,
    "number_of_frames": Instance.number_of_frames, "header_blob": Instance.header_blob,
    "header_dictionary": Instance.header_dictionary,
}


def _statement(level: _Level, request: _Request, ctx: _Context, study_uid: str | None,
               series_uid: str | None) -> Select[Any]:
    columns = dict(_STUDY_COLUMNS)
    if level is not _STUDY:
        columns |= _SERIES_COLUMNS
    if level is _INSTANCE:
        columns |= _INSTANCE_COLUMNS
    labelled: list[Any] = [column.label(name) for name, column in columns.items()]
    query: Select[Any] = select(*labelled)
    if level is _STUDY:
        query = query.order_by(Study.study_date.desc().nulls_last(), Study.id.desc())
    elif level is _SERIES:
        query = query.join(Study, Series.study_id == Study.id).order_by(
            Study.id, Series.series_number.asc().nulls_last(), Series.id)
    else:
        query = query.join(Series, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id).where(
            Instance.conflict_seq == 0).order_by(
            Study.id, Series.id, Instance.instance_number.asc().nulls_last(), Instance.id)
    if level is not _STUDY and not ctx.include_derived and series_uid is None:
        query = query.where(Series.derived_from_id.is_(None))
    if study_uid is not None:
        query = query.where(Study.study_uid == study_uid)
    if series_uid is not None:
        query = query.where(Series.series_uid == series_uid)
    for tag, value in request.conditions:
        condition = level.keys[tag](value, ctx)
        if condition is not None:
            query = query.where(condition)
    return query.limit(request.limit + 1).offset(request.offset)


def _patient_statement(request: _Request, ctx: _Context) -> Select[Any]:
    """Patient IDs with a matching study, then every study of those patients: counted, the newest one named."""
    matched = select(Study.patient_id).where(Study.patient_id.is_not(None))
    for tag, value in request.conditions:
        condition = _PATIENT.keys[tag](value, ctx)
        if condition is not None:
            matched = matched.where(condition)
    every = aliased(Study)  # not Study: the matching subquery must not correlate with the outer query
    series = every.num_series + every.num_derived_series if ctx.include_derived else every.num_series
    instances = every.num_instances + every.num_derived_instances if ctx.include_derived else every.num_instances
    patients = (select(every.patient_id.label("pid"), func.max(every.id).label("newest"),
                       func.count(every.id).label("patient_num_studies"),
                       func.sum(series).label("patient_num_series"),
                       func.sum(instances).label("patient_num_instances"))
                .where(every.patient_id.in_(matched)).group_by(every.patient_id).subquery())
    newest = aliased(Study)
    return (select(patients.c.pid.label("patient_id"), newest.patient_name.label("patient_name"),
                   newest.patient_birth_date.label("patient_birth_date"), newest.patient_sex.label("patient_sex"),
                   patients.c.patient_num_studies, patients.c.patient_num_series, patients.c.patient_num_instances)
            .join(newest, newest.id == patients.c.newest).order_by(patients.c.pid)
            .limit(request.limit + 1).offset(request.offset))


def _search(archive: Archive, level: _Level, params: Mapping[str, Sequence[str]], *, base_url: str,
            study_uid: str | None = None, series_uid: str | None = None) -> QidoResult:
    request = _parse(level, params)
    header_tags = {t for t in request.returned if t not in level.catalog}
    needs_headers = bool(header_tags) or request.include_all
    if needs_headers and request.limit > MAX_HEADER_LIMIT:
        request.limit = MAX_HEADER_LIMIT
    elif request.limit > MAX_LIMIT:
        request.limit = MAX_LIMIT
    with archive.unit_of_work() as uow:
        dialect = uow.session.get_bind().dialect.name
        ctx = _Context(base_url.rstrip("/"), request.include_derived, dialect)
        if dialect == "sqlite":
            _register_sqlite_lower(uow.session)
        rows = list(uow.session.execute(_statement(level, request, ctx, study_uid, series_uid)).mappings())
        if not rows and (study_uid is not None or series_uid is not None):
            _check_path(uow.session, study_uid, series_uid)
        if len(rows) > request.limit:
            rows = rows[:request.limit]
            if request.client_limit is None or request.client_limit != request.limit:
                request.warnings.append(TRUNCATED)
        default = {a.tag for a in level.attrs}
        plan = sorted((a for t, a in level.catalog.items()
                       if t in default or t in request.returned or request.include_all), key=lambda a: a.tag)
        matches = [_json_of(row, plan, ctx) for row in rows]
        headers = _headers(uow, level, rows, needs_headers, ctx)
        for row, match in zip(rows, matches):
            header = headers.get(_row_key(level, row))
            if header is not None:
                _add_from_header(match, header, level, header_tags, request.include_all, row)
    return QidoResult(matches, request.warnings)


def _check_path(session: Session, study_uid: str | None, series_uid: str | None) -> None:
    """An empty answer under a path that names no study (or no series of it) is a 404, not an empty list."""
    if study_uid is not None and session.scalar(select(Study.id).where(Study.study_uid == study_uid)) is None:
        raise NotFoundError(f"no study {study_uid!r}")
    if series_uid is not None:
        query = select(Series.id).join(Study, Series.study_id == Study.id).where(Series.series_uid == series_uid)
        if study_uid is not None:
            query = query.where(Study.study_uid == study_uid)
        if session.scalar(query) is None:
            raise NotFoundError(f"no series {series_uid!r}" + (f" in study {study_uid!r}" if study_uid else ""))


# --- DICOM JSON



def _person_name(value: str) -> dict[str, Any]:
    """A PN value's component groups (``=``-separated) as PS3.18 F.2.2 names them."""
    names = {k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), value.split("=")) if g}
    return {"vr": "PN", "Value": [names]} if names else {"vr": "PN"}


def _json_of(row: RowMapping, plan: Sequence[_Attr], ctx: _Context) -> dict[str, Any]:
    """The catalog's attributes of one answer row (``plan`` is in tag order, PS3.18 F.2.1.1); the hot loop."""
    out: dict[str, Any] = {}
    for a in plan:
        value = row[a.column] if a.column is not None else a.get(row, ctx)  # type: ignore[misc]
        if value is None or value == "":
            out[a.key] = {"vr": a.vr}  # present, without a value (empty in the catalog)
        elif a.kind == "str":
            out[a.key] = {"vr": a.vr, "Value": value.split("\\")}  # a multi-valued string is stored joined
        elif a.kind == "int":
            out[a.key] = {"vr": a.vr, "Value": [int(value)]}
        elif a.kind == "pn":
            out[a.key] = _person_name(value)
        elif a.kind == "float":
            out[a.key] = {"vr": a.vr, "Value": [float(value)]}
        else:
            out[a.key] = {"vr": a.vr, "Value": [value]}
    return out


def _row_key(level: _Level, row: RowMapping) -> int:
    return int(row["study_pk"] if level is _STUDY else row["series_pk"] if level is _SERIES else row["instance_pk"])


def _headers(uow: UnitOfWork, level: _Level, rows: list[RowMapping], needs_headers: bool,
             ctx: _Context) -> dict[int, Dataset]:
    """Representative headers by row key: the first instance of a study or series, the instance itself."""
    if level is _SERIES:  # a derived series says so in its ImageType, read from its header
        keys = [int(r["series_pk"]) for r in rows if needs_headers or r["derived_from_id"] is not None]
    else:
        keys = [_row_key(level, r) for r in rows] if needs_headers else []
    if not keys:
        return {}
    if level is _INSTANCE:
        blobs = {int(r["instance_pk"]): (r["header_blob"], r["header_dictionary"]) for r in rows}
    else:
        owner = Series.study_id if level is _STUDY else Instance.series_id
        first = (select(owner.label("owner"), func.min(Instance.id).label("first"))
                 .join(Series, Instance.series_id == Series.id)
                 .where(owner.in_(keys), Instance.conflict_seq == 0).group_by(owner))
        if level is _STUDY and not ctx.include_derived:
            first = first.where(Series.derived_from_id.is_(None))
        firsts = {int(o): int(i) for o, i in uow.session.execute(first)}
        found = {int(i): (b, d) for i, b, d in uow.session.execute(
            select(Instance.id, Instance.header_blob, Instance.header_dictionary)
            .where(Instance.id.in_(list(firsts.values()))))}
        blobs = {o: found[i] for o, i in firsts.items() if i in found}
    headers = {}
    for key in keys:
        if key in blobs:
            blob, dictionary = blobs[key]
            headers[key] = read_header(uow.read_header(blob, dictionary))
    return headers


def _add_from_header(match: dict[str, Any], header: Dataset, level: _Level, tags: set[int], include_all: bool,
                     row: RowMapping) -> None:
    """Attributes the catalog lacks, from the header; the catalog's own values (and ISO_IR 192) are kept."""
    wanted = set(tags)
    if level is _SERIES and row["derived_from_id"] is not None:
        wanted.add(0x00080008)  # ImageType: DERIVED
    if include_all:
        if level is _INSTANCE:
            wanted.update(int(e.tag) for e in header if e.tag.group > 0x0002)
        else:
            wanted.update(int(t) for t in (tag_for_keyword(k) for k in level.header_all) if t is not None)
            if level is _STUDY:
                wanted.update(int(e.tag) for e in header if e.tag.group == 0x0010 and not e.tag.is_private)
    for tag in sorted(wanted):
        key = f"{tag:08X}"
        if key in match or tag in (_UTF8_TAG, 0x7FE00010) or tag not in header:
            continue
        element = header[tag]
        if element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") and len(element.value or b"") > INLINE_BINARY_MAX:
            continue
        try:
            match[key] = element.to_json_dict(None, INLINE_BINARY_MAX)
        except Exception as exc:  # a value pydicom cannot express in JSON (a malformed IS): left out, not an error
            _log.debug("includefield %s left out: %s", key, exc)
    if include_all or wanted - tags:
        ordered = dict(sorted(match.items()))
        match.clear()
        match.update(ordered)
