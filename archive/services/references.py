"""Every column that references a blob, in one place: what verification checks, what the collector keeps.

Garbage collection, verification and the reconciler's missing-blob check all
take their reference set from here, so a new kind of reference (a codec's
context blob: a basis, a codebook) is protected everywhere at once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, exists, null, select, union_all

from archive.catalog.models import (
    EncodedFrame,
    Encoding,
    HeaderDictionary,
    HeaderRevision,
    Instance,
    Series,
)


def blob_references(study_id: int | None = None, *, instance_ids: Select[Any] | None = None) -> Select[tuple[str, int]]:
    """(digest, instance id) for every blob reference, optionally of one study's instances or of ``instance_ids``.

    Frames, codec context blobs, header blobs and dictionaries, header
    revisions. Whole-archive runs also list trained header dictionaries no
    instance uses yet (instance id NULL).
    """
    frames = select(EncodedFrame.blob_sha256.label("digest"), Encoding.instance_id.label("instance_id")).join(
        Encoding, Encoding.id == EncodedFrame.encoding_id)
    contexts = select(Encoding.context_blob.label("digest"), Encoding.instance_id.label("instance_id")).where(
        Encoding.context_blob.is_not(None), Encoding.released_at.is_(None))
    headers = select(Instance.header_blob.label("digest"), Instance.id.label("instance_id"))
    dictionaries = select(Instance.header_dictionary.label("digest"), Instance.id.label("instance_id")).where(
        Instance.header_dictionary.is_not(None))
    revisions = select(HeaderRevision.header_blob.label("digest"), HeaderRevision.instance_id.label("instance_id"))
    revision_dictionaries = select(HeaderRevision.header_dictionary.label("digest"),
                                   HeaderRevision.instance_id.label("instance_id")).where(
        HeaderRevision.header_dictionary.is_not(None))
    scope = instance_ids
    if study_id is not None:
        scope = select(Instance.id).join(Series, Series.id == Instance.series_id).where(Series.study_id == study_id)
    if scope is not None:
        frames = frames.where(Encoding.instance_id.in_(scope))
        contexts = contexts.where(Encoding.instance_id.in_(scope))
        headers = headers.where(Instance.id.in_(scope))
        dictionaries = dictionaries.where(Instance.id.in_(scope))
        revisions = revisions.where(HeaderRevision.instance_id.in_(scope))
        revision_dictionaries = revision_dictionaries.where(HeaderRevision.instance_id.in_(scope))
        return select(union_all(frames, contexts, headers, dictionaries, revisions, revision_dictionaries).subquery())
    trained = select(HeaderDictionary.blob_sha256.label("digest"), null().label("instance_id"))
    return select(union_all(frames, contexts, headers, dictionaries, revisions, revision_dictionaries,
                            trained).subquery())


def is_referenced(digest: Any) -> ColumnElement[bool]:
    """True where something in the catalog references the blob ``digest`` (a column or value)."""
    return (
        exists().where(EncodedFrame.blob_sha256 == digest)
        | exists().where(Encoding.context_blob == digest)
        | exists().where(Instance.header_blob == digest)
        | exists().where(Instance.header_dictionary == digest)
        | exists().where(HeaderDictionary.blob_sha256 == digest)
        | exists().where(HeaderRevision.header_blob == digest)
        | exists().where(HeaderRevision.header_dictionary == digest)
    )
