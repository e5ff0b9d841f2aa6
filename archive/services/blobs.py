"""Blobs through the catalog: the ``blobs`` table is the index that says where each blob is.

Readers look a digest's location up here and hand it to the store, which
re-hashes what it reads. Writers record locations in the same transaction
that references the blobs, after the store has made them durable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from archive.catalog.models import Blob
from archive.codecs import decode_frame
from archive.clock import utcnow
from archive.errors import ArchiveError, BlobNotFoundError
from archive.store import BlobRef, BlobStore

_PAGE = 500


def blob_refs(session: Session, digests: Iterable[str]) -> dict[str, BlobRef]:
    """Where each digest is stored; a digest without a catalog row is missing from the result."""
    wanted = sorted(set(digests))
    found: dict[str, BlobRef] = {}
    for start in range(0, len(wanted), _PAGE):
        for row in session.execute(
            select(Blob.sha256, Blob.size, Blob.pack, Blob.offset).where(Blob.sha256.in_(wanted[start:start + _PAGE]))
        ):
            found[row.sha256] = BlobRef(row.sha256, row.size, row.pack, row.offset)
    return found


def read_blobs(session: Session, store: BlobStore, digests: Sequence[str]) -> list[bytes]:
    """The blobs' bytes in the order asked, each checked against its digest (one catalog query for all)."""
    refs = blob_refs(session, digests)
    out = []
    for digest in digests:
        ref = refs.get(digest)
        if ref is None:
            raise BlobNotFoundError(f"blob {digest} has no catalog row")
        out.append(store.get(ref))
    return out


def read_blob(session: Session, store: BlobStore, digest: str) -> bytes:
    return read_blobs(session, store, [digest])[0]


def record_blobs(session: Session, refs: Iterable[BlobRef]) -> None:
    """Insert or refresh blob rows in the transaction that references them (one multi-row upsert per page).

    The newest copy wins: a re-put content points the row at the copy just
    written and made durable (which also repairs a corrupt older copy), and
    ``created_at`` restarts the garbage collector's grace period. Sorted, so
    concurrent writers lock rows in the same order.
    """
    now = utcnow()
    unique = {ref.digest: ref for ref in refs}
    rows = [{"sha256": r.digest, "size": r.size, "pack": r.pack, "offset": r.offset, "created_at": now}
            for _, r in sorted(unique.items())]
    for start in range(0, len(rows), _PAGE):
        upsert(session, Blob, rows[start:start + _PAGE], "sha256", refresh=("created_at", "size", "pack", "offset"))


def upsert(
    session: Session, model: type[Any], values: dict[str, Any] | list[dict[str, Any]], key: str,
    refresh: tuple[str, ...] = (),
) -> None:
    """INSERT ... ON CONFLICT: concurrent workers may create the same study, series or blob.

    Columns in ``refresh`` are overwritten on conflict; without any, the existing row is kept.
    """
    rows = [values] if isinstance(values, dict) else values
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement: Any = pg_insert(model)
    elif dialect == "sqlite":
        statement = sqlite_insert(model)
    else:  # pragma: no cover - other databases are not supported yet
        raise ArchiveError(f"unsupported catalog database {dialect}")
    if refresh:
        statement = statement.on_conflict_do_update(
            index_elements=[key], set_={name: statement.excluded[name] for name in refresh}
        )
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[key])
    # one statement compiled once (cached), its rows sent as an executemany the driver batches
    session.connection().execute(statement, rows)


def read_context(session: Session, store: BlobStore, digest: str | None) -> bytes | None:
    """An encoding's context blob (a basis, a codebook; re-hashed on read), or None when it has none."""
    return read_blob(session, store, digest) if digest else None


def decode_encoding(session: Session, store: BlobStore, digests: Sequence[str], context_digest: str | None
                    ) -> list[Any]:
    """The frames of an encoding, read (each blob re-hashed) and decoded with its context blob, if it has one."""
    context = read_context(session, store, context_digest)
    return [decode_frame(blob, context) for blob in read_blobs(session, store, list(digests))]
