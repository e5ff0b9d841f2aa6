"""C-FIND (Patient Root and Study Root, every level): the QIDO-RS queries behind a DIMSE identifier.

The translation lives in :mod:`archive.services.cfind`, so C-FIND and QIDO-RS
match alike (wildcards, date ranges, UID lists, character sets) on the same
catalog queries; this module is the pynetdicom glue: one pending answer per
match, C-CANCEL honoured between matches, failures answered with a comment,
and one access-log row per query shape (attribute names, never values).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from archive.dimse.context import ScpContext
from archive.dimse.store import failure
from archive.errors import ArchiveError
from archive.kinds import AccessAction
from archive.errors import IdentifierError
from archive.services.cfind import find

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class
INVALID_QUERY = 0xC000  # Unable to process: a key's value cannot be matched (a malformed date range)
CANNOT_DECODE = 0xC310  # Unable to process: the identifier cannot be parsed
UNABLE_TO_PROCESS = 0xC311  # Unable to process: the archive failed


def handle_find(event: Any, ctx: ScpContext) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """pynetdicom's EVT_C_FIND handler: ``(0xFF00, answer)`` per match; pynetdicom adds the final success."""
    association = ctx.log_of(event.assoc)
    matches, status, target = 0, 0, "C-FIND"
    try:
        identifier: Dataset = event.identifier
        target = _target(identifier)
        _, answers = find(ctx.archive, identifier, str(event.request.AffectedSOPClassUID),
                              include_derived=ctx.include_derived(event.assoc), aet=ctx.settings.scp_aet)
        for answer in answers:
            if event.is_cancelled:
                status = CANCEL
                yield CANCEL, None
                return
            matches += 1
            yield PENDING, answer
    except IdentifierError as exc:
        status = IDENTIFIER_MISMATCH
        yield failure(status, str(exc)), None
    except ArchiveError as exc:
        status = INVALID_QUERY
        yield failure(status, str(exc)), None
    except Exception as exc:  # noqa: BLE001  (an answer, not a dropped association; the log keeps the trace)
        status = CANNOT_DECODE if target == "C-FIND" else UNABLE_TO_PROCESS
        log.exception("C-FIND from %s failed", association.calling_ae)
        yield failure(status, f"cannot {'parse the identifier' if status == CANNOT_DECODE else 'search'}: "
                              f"{type(exc).__name__}"), None
    finally:
        association.add(AccessAction.SEARCH, target, instances=matches, status=status)


def _target(identifier: Dataset) -> str:
    """``C-FIND STUDY: PatientID, StudyDate``: the level and the keys' names (the level is a code string)."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()[:16] or "(no level)"
    names = sorted({keyword_for_tag(int(e.tag)) or f"{int(e.tag):08X}" for e in identifier
                    if e.tag.group > 0x0002 and e.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet")})
    return f"C-FIND {level}: {', '.join(names)}"
