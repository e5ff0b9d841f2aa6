"""Use case: what a C-GET or C-MOVE identifier selects, and in which transfer syntax each instance goes out.

Kept free of pynetdicom so the choices can be tested without a network:
:mod:`archive.dimse.retrieve` is the glue that sends. The selection reuses the
WADO-RS plan (:func:`archive.services.wado.plan_retrieval`), so DIMSE and
DICOMweb give back the same instances: conflicts are never sent, derived
series only when named (or for the AEs in ``scp_derived_aes``), and an original
whose lossless form a policy released is listed apart (``lossy_only``): it is
never sent under its own UID.

Retrieval is hierarchical (PS3.4 C.4.2.2.1) with the unique keys alone: the
key of the retrieve level may list several values (backslash), the keys above
it may be left out (the catalog knows where a series or an instance lives) and,
when given, must agree. A well-formed identifier that matches nothing selects
nothing: the SCP answers Success with zero sub-operations, as dcm4chee does.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)
from sqlalchemy import select

from archive.catalog.models import Instance, Series, Study
from archive.dicom.writer import to_part10
from archive.errors import ArchiveError, IdentifierError, NotFoundError
from archive.services.runtime import Archive
from archive.services.wado import PlannedInstance, build_instance, plan_retrieval

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
#: The unique key of each retrieve level (PS3.4 C.6.1.1 and C.6.2.1).
UNIQUE_KEYS = {PATIENT: "PatientID", STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID",
               IMAGE: "SOPInstanceUID"}
_ORDER = (PATIENT, STUDY, SERIES, IMAGE)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: After those, JPEG-LS (often the stored codestream itself, sent without decoding), then JPEG 2000.
LOSSLESS_REWRITES = (JPEGLSLossless, JPEG2000Lossless)
MAX_KEYS = 1000  # values in one list of unique keys: a bound on the work one identifier can ask for



@dataclass(frozen=True)
class RetrieveRequest:
    """The retrieve level and the unique keys given, each a tuple of values (a list when backslash-separated)."""

    level: str
    patient_ids: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    instance_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SelectedInstance:
    planned: PlannedInstance
    sop_class_uid: str
    target: str  # the UID path it was asked by (study[/series[/instance]]): the access log's target


@dataclass
class Selection:
    """The instances to send, in order, and the originals left out (only a lossy derivative is held)."""

    instances: list[SelectedInstance] = field(default_factory=list)
    lossy_only: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, target)

    @property
    def suboperations(self) -> int:
        """Every instance asked for is one sub-operation: a lossy-only original is a failed one."""
        return len(self.instances) + len(self.lossy_only)

    def sop_classes(self) -> list[str]:
        return sorted({selected.sop_class_uid for selected in self.instances})


# --- the identifier


def parse_identifier(identifier: Dataset, *, patient_root: bool) -> RetrieveRequest:
    """The level and unique keys of a Patient Root or Study Root identifier, or :class:`IdentifierError`."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    allowed = _ORDER if patient_root else _ORDER[1:]
    if level not in allowed:
        model = "Patient Root" if patient_root else "Study Root"
        raise IdentifierError(f"Query/Retrieve Level {level or '(none)'!r} is not one of {model}'s: "
                              + ", ".join(allowed))
    keys = {name: _values(identifier, keyword) for name, keyword in UNIQUE_KEYS.items()}
    if not keys[level]:
        raise IdentifierError(f"{UNIQUE_KEYS[level]} is required at the {level} level")
    below = _ORDER[_ORDER.index(level) + 1:]
    for name in below:
        if keys[name]:
            raise IdentifierError(f"{UNIQUE_KEYS[name]} is below the {level} level: not a key of this retrieve")
    for name in _ORDER[:_ORDER.index(level)]:
        if len(keys[name]) > 1:
            raise IdentifierError(f"{UNIQUE_KEYS[name]} above the retrieve level must be a single value")
    return RetrieveRequest(level, keys[PATIENT], keys[STUDY], keys[SERIES], keys[IMAGE])


def _values(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    value = identifier.get(keyword)
    if value is None or value == "":
        return ()
    items = value if isinstance(value, pydicom.multival.MultiValue) else str(value).split("\\")
    found = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if len(found) > MAX_KEYS:
        raise IdentifierError(f"{keyword} lists {len(found)} values: at most {MAX_KEYS} in one request")
    return found


# --- what it selects


def select_instances(archive: Archive, request: RetrieveRequest, *, include_derived: bool = False) -> Selection:
    """The instances ``request`` names, each once, in the order WADO-RS gives them."""
    selection = Selection()
    seen: set[int] = set()
    for study_uid, series_uid, instance_uids, target in _targets(archive, request):
        try:
            plan = plan_retrieval(archive, study_uid, series_uid, include_derived=include_derived)
        except NotFoundError:
            continue  # gone since it was resolved, or a study with nothing to send
        wanted = None if instance_uids is None else set(instance_uids)
        for planned in plan.instances:
            if (wanted is None or planned.sop_instance_uid in wanted) and planned.id not in seen:
                seen.add(planned.id)
                path = target if wanted is None else f"{target}/{planned.sop_instance_uid}"
                selection.instances.append(SelectedInstance(planned, "", path))
        for uid in plan.lossy_only:
            if wanted is None or uid in wanted:
                selection.lossy_only.append((uid, target if wanted is None else f"{target}/{uid}"))
    classes = _sop_classes(archive, [selected.planned.id for selected in selection.instances])
    selection.instances = [SelectedInstance(s.planned, classes.get(s.planned.id, ""), s.target)
                           for s in selection.instances]
    return selection


def _targets(archive: Archive, request: RetrieveRequest
             ) -> list[tuple[str, str | None, tuple[str, ...] | None, str]]:
    """(study UID, series UID or None, instance UIDs or None, target) for each plan the request needs."""
    with archive.unit_of_work() as uow:
        session = uow.session
        patient = Study.patient_id == request.patient_ids[0] if request.patient_ids else None
        if request.level == PATIENT:
            studies = session.scalars(select(Study.study_uid).where(Study.patient_id.in_(request.patient_ids))
                                      .order_by(Study.study_date, Study.id)).all()
            return [(uid, None, None, uid) for uid in studies]
        if request.level == STUDY:
            query = select(Study.study_uid).where(Study.study_uid.in_(request.study_uids))
            found = set(session.scalars(query if patient is None else query.where(patient)).all())
            return [(uid, None, None, uid) for uid in request.study_uids if uid in found]
        where = Study.study_uid == request.study_uids[0] if request.study_uids else None
        if patient is not None:
            where = patient if where is None else where & patient
        if request.level == SERIES:
            series_query = (select(Study.study_uid, Series.series_uid).join(Series, Series.study_id == Study.id)
                            .where(Series.series_uid.in_(request.series_uids)))
            rows = {series: study for study, series in session.execute(
                series_query if where is None else series_query.where(where)).all()}
            return [(rows[uid], uid, None, f"{rows[uid]}/{uid}") for uid in request.series_uids if uid in rows]
        image_query = (select(Study.study_uid, Series.series_uid, Instance.sop_instance_uid)
                       .join(Series, Series.study_id == Study.id).join(Instance, Instance.series_id == Series.id)
                       .where(Instance.sop_instance_uid.in_(request.instance_uids), Instance.conflict_seq == 0))
        if request.series_uids:
            image_query = image_query.where(Series.series_uid == request.series_uids[0])
        if where is not None:
            image_query = image_query.where(where)
        grouped: dict[tuple[str, str], list[str]] = {}
        for study, series, instance in session.execute(image_query).all():
            grouped.setdefault((study, series), []).append(instance)
        return [(study, series, tuple(uids), f"{study}/{series}") for (study, series), uids in grouped.items()]


def _sop_classes(archive: Archive, ids: list[int]) -> dict[int, str]:
    found: dict[int, str] = {}
    with archive.unit_of_work() as uow:
        for start in range(0, len(ids), 500):
            for instance_id, sop_class in uow.session.execute(
                    select(Instance.id, Instance.sop_class_uid).where(Instance.id.in_(ids[start:start + 500]))):
                found[instance_id] = sop_class or ""
    return found


# --- which transfer syntax


def stored_syntax(planned: PlannedInstance) -> str | None:
    """The syntax the instance arrived in, when it can be given back as such (a standard one we write)."""
    received = UID(planned.transfer_syntax_uid)
    return received if received in planned.producible() and received in AllTransferSyntaxes else None


def sendable_syntaxes(planned: PlannedInstance) -> list[str]:
    """Every syntax the instance can be sent in, best first: stored, Explicit VR LE, Implicit VR LE, the rest.

    Implicit VR Little Endian, the DICOM default, is produced from Explicit VR
    Little Endian wherever that is, so any instance with native pixels has it.
    """
    producible = set(planned.producible())
    if ExplicitVRLittleEndian in producible:
        producible.add(ImplicitVRLittleEndian)
    stored = stored_syntax(planned)
    first = [s for s in (stored, *UNCOMPRESSED, *LOSSLESS_REWRITES) if s is not None and s in producible]
    ordered = list(dict.fromkeys(first))
    return ordered + sorted(s for s in producible if s not in ordered)


def choose_syntax(planned: PlannedInstance, accepted: Collection[str]) -> str | None:
    """The best syntax among ``accepted`` (what the peer took for the instance's SOP class); None: none fits."""
    return next((s for s in sendable_syntaxes(planned) if s in accepted), None)


def move_proposal(selection: Selection) -> dict[str, list[str]]:
    """Per SOP class, the syntaxes to propose to a C-MOVE destination, each to be its own presentation context.

    The stored syntax of any of its instances (where standard), then Explicit
    and Implicit VR Little Endian: the destination picks, the instance goes in
    the best it accepted.
    """
    proposal: dict[str, list[str]] = {}
    for selected in selection.instances:
        syntaxes = proposal.setdefault(selected.sop_class_uid, [])
        stored = stored_syntax(selected.planned)
        if stored is not None and stored not in syntaxes and stored not in UNCOMPRESSED:
            syntaxes.insert(0, stored)
    for syntaxes in proposal.values():
        syntaxes.extend(UNCOMPRESSED)
    return proposal


def build_part10(archive: Archive, planned: PlannedInstance, syntax: str) -> bytes:
    """The instance as Part 10 bytes in ``syntax`` (one of :func:`sendable_syntaxes`)."""
    direct = syntax in planned.producible()
    built = build_instance(archive, planned, syntax if direct else ExplicitVRLittleEndian)
    if built.transfer_syntax == syntax:
        return built.data
    if syntax == ImplicitVRLittleEndian and built.transfer_syntax == ExplicitVRLittleEndian:
        return to_implicit(built.data)
    raise ArchiveError(f"instance {planned.sop_instance_uid} came out as {UID(built.transfer_syntax).name}, "
                       f"not {UID(syntax).name}")


def to_implicit(data: bytes) -> bytes:
    """An Explicit VR Little Endian Part 10 file re-written as Implicit VR Little Endian (values unchanged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
    return to_part10(ds, ImplicitVRLittleEndian)


def accepted_by_class(contexts: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """(abstract syntax, transfer syntax) pairs grouped by SOP class."""
    grouped: dict[str, set[str]] = {}
    for abstract, transfer in contexts:
        grouped.setdefault(str(abstract), set()).add(str(transfer))
    return grouped
