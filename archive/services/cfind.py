"""C-FIND identifiers (PS3.4 C.4.1) as QIDO-RS queries, and QIDO matches as C-FIND answers.

A DIMSE query and a QIDO-RS query are the same catalog query: the
identifier's keys with a value become QIDO matching parameters (UID lists,
wildcards and date ranges keep their DICOM syntax, which QIDO shares), and
every key becomes a return key (``includefield``). Searching pages through
QIDO's results with ``offset`` so a C-FIND answers every match, however many.
An answer holds only the keys the identifier asked for, encoded in the
study's own Specific Character Set when that can hold the values, else UTF-8.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.charset import custom_encoders, python_encoding
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import select

from archive.catalog.models import Study
from archive.errors import IdentifierError
from archive.services import qido
from archive.services.runtime import Archive

_log = logging.getLogger(__name__)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
LEVELS = {PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"), STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE")}
UNIQUE_KEY = {"PATIENT": 0x00100020, "STUDY": 0x0020000D, "SERIES": 0x0020000E, "IMAGE": 0x00080018}
PAGE = qido.MAX_LIMIT  # asked per QIDO call; QIDO may cut a page shorter (headers to read), paging goes on anyway
UTF8 = "ISO_IR 192"
SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE = 0x00080005, 0x00080052, 0x00080054
STUDY_UID, PATIENT_ID = 0x0020000D, 0x00100020
_NOT_KEYS = frozenset({SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE})
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})  # the VRs Specific Character Set applies to
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})
_DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})  # ASCII (PS3.3 C.12.1.1.2)
_IN_CHUNK = 500  # UIDs per IN (...) when looking up character sets



@dataclass(frozen=True)
class FindQuery:
    """A C-FIND identifier, translated: what to search and what to answer."""

    level: str  # PATIENT, STUDY, SERIES or IMAGE
    params: dict[str, list[str]]  # QIDO parameters (keyword -> [value]), includefield and includederived
    asked: dict[int, str]  # the return keys by tag, with their VR: the answer holds exactly these (and the level)

    @property
    def keywords(self) -> list[str]:
        """The asked keys' names, sorted: what the access log records (never values)."""
        return sorted(keyword_for_tag(tag) or f"{tag:08X}" for tag in self.asked)


def query_of(identifier: Dataset, sop_class_uid: str, *, include_derived: bool) -> FindQuery:
    """The QIDO query of a C-FIND identifier (values decoded with its Specific Character Set by pydicom)."""
    levels = LEVELS.get(str(sop_class_uid))
    if levels is None:
        raise IdentifierError(f"C-FIND of {sop_class_uid} is not supported")
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not level:
        raise IdentifierError("the identifier has no Query/Retrieve Level")
    if level not in levels:
        model = "Patient Root" if sop_class_uid == PATIENT_ROOT_FIND else "Study Root"
        raise IdentifierError(f"{model} has no {level[:16]} level")
    params: dict[str, list[str]] = {}
    asked: dict[int, str] = {}
    for element in identifier:
        tag = int(element.tag)
        if element.tag.group <= 0x0002 or element.tag.is_private or tag in _NOT_KEYS:
            continue
        keyword = keyword_for_tag(tag) or f"{tag:08X}"
        asked[tag] = element.VR
        text = matching_value(element)
        if text:
            params[keyword] = [text]
    unique = UNIQUE_KEY[level]
    asked.setdefault(unique, "UI" if level != "PATIENT" else "LO")
    params["includefield"] = [",".join(f"{tag:08X}" for tag in asked)]
    if include_derived:
        params["includederived"] = ["true"]
    return FindQuery(level, params, asked)


def matching_value(element: DataElement) -> str:
    """An element's value as QIDO takes it: a list joined with backslashes; '' when it asks for no matching."""
    if element.VR in _BINARY_VRS or element.value is None:
        return ""
    value = element.value
    if isinstance(value, (MultiValue, list, tuple)):
        text = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes):
        return ""
    else:
        text = str(value)
    return text.strip()


def search(archive: Archive, query: FindQuery) -> Iterator[dict[str, Any]]:
    """Every QIDO match of the query (DICOM JSON), page by page: no limit but the catalog."""
    offset = 0
    while True:
        params = dict(query.params, limit=[str(PAGE)], offset=[str(offset)])
        if query.level == "PATIENT":
            result = qido.search_patients(archive, params)
        elif query.level == "STUDY":
            result = qido.search_studies(archive, params)
        elif query.level == "SERIES":
            result = qido.search_series(archive, None, params)
        else:
            result = qido.search_instances(archive, None, None, params)
        yield from result.matches
        if not result.matches or (len(result.matches) < PAGE and qido.TRUNCATED not in result.warnings):
            return
        offset += len(result.matches)


def search_pages(archive: Archive, query: FindQuery) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Each match with the Specific Character Set its study was received in (one catalog look-up per page)."""
    page: list[dict[str, Any]] = []
    for match in search(archive, query):
        page.append(match)
        if len(page) == _IN_CHUNK:
            yield from _with_character_sets(archive, query.level, page)
            page = []
    yield from _with_character_sets(archive, query.level, page)


def _with_character_sets(archive: Archive, level: str, page: list[dict[str, Any]]
                         ) -> Iterator[tuple[dict[str, Any], str | None]]:
    if not page:
        return
    by_patient = level == "PATIENT"
    key = f"{PATIENT_ID if by_patient else STUDY_UID:08X}"
    owners = {str(v[0]) for m in page if (v := m.get(key, {}).get("Value"))}
    column = Study.patient_id if by_patient else Study.study_uid
    found: dict[str, str | None] = {}
    with archive.unit_of_work() as uow:
        for owner, character_set in uow.session.execute(
                select(column, Study.specific_character_set).where(column.in_(sorted(owners))).order_by(Study.id)):
            found[str(owner)] = character_set  # a patient's newest study wins, as in search_patients
    for match in page:
        value = match.get(key, {}).get("Value")
        yield match, found.get(str(value[0])) if value else None


def answer_of(match: dict[str, Any], query: FindQuery, stored_character_set: str | None, aet: str) -> Dataset:
    """The C-FIND answer to one match: the asked keys (empty where unknown), the level, the retrieve AE."""
    known = {key: match[key] for key in (f"{tag:08X}" for tag in query.asked) if key in match}
    try:
        answer = Dataset.from_json(known)
    except Exception:  # noqa: BLE001  (one odd header value: answer the others, that one empty)
        answer = Dataset()
        for key, value in known.items():
            try:
                answer.update(Dataset.from_json({key: value}))
            except Exception:  # noqa: BLE001
                _log.debug("C-FIND answer: %s left empty", key)
    for tag, vr in query.asked.items():
        if tag not in answer:
            answer.add(DataElement(tag, vr, DicomSequence() if vr == "SQ" else None))
    answer.QueryRetrieveLevel = query.level
    answer.RetrieveAETitle = aet
    character_set = answer_character_set(stored_character_set, _texts(answer))
    if character_set:
        answer.SpecificCharacterSet = character_set
    return answer


def _texts(answer: Dataset) -> Iterator[str]:
    for element in answer:
        if element.VR in _TEXT_VRS and element.value:
            values = element.value if isinstance(element.value, (MultiValue, list)) else [element.value]
            yield from (str(v) for v in values)


def answer_character_set(stored: str | None, values: Iterable[str]) -> str | None:
    """The study's own character set when it can encode every value, else UTF-8 (None: ASCII, nothing known stored)."""
    special = [v for v in values if not v.isascii()]
    stored = (stored or "").strip()
    codecs = _codecs(stored) if stored else None
    if not special:
        return stored if codecs else None
    if codecs and all(any(_encodes(ch, codec) for codec in codecs) for v in special for ch in v):
        return stored  # ISO 2022 extensions: each character in one of them, as pydicom writes it
    return UTF8


def _codecs(character_set: str) -> list[str] | None:
    """Python's codecs of a Specific Character Set; None when a term is unknown (pydicom would write Latin-1)."""
    codecs = []
    for term in (t.strip() for t in character_set.split("\\")):
        codec = "ascii" if term in _DEFAULT_REPERTOIRE else python_encoding.get(term)
        if codec is None:
            return None
        codecs.append(codec)
    return codecs


def _encodes(text: str, codec: str) -> bool:
    try:
        encoder = custom_encoders.get(codec)
        if encoder is not None:
            encoder(text, "strict")
        else:
            text.encode(codec)
    except (UnicodeError, LookupError, ValueError):
        return False
    return True


def find(archive: Archive, identifier: Dataset, sop_class_uid: str, *, include_derived: bool, aet: str,
         ) -> tuple[FindQuery, Iterator[Dataset]]:
    """The translated query and the C-FIND answers it has (lazily: a cancelled find stops reading the catalog)."""
    query = query_of(identifier, sop_class_uid, include_derived=include_derived)
    return query, (answer_of(m, query, cs, aet) for m, cs in search_pages(archive, query))

