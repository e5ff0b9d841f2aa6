"""The unit of work: one transaction and the blob store, rolled back unless committed."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Self

from sqlalchemy.orm import Session, sessionmaker

from archive.store import BlobStore

if TYPE_CHECKING:
    from archive.services.header_dictionaries import HeaderDictionaries


class UnitOfWork:
    session: Session

    def __init__(self, session_factory: sessionmaker[Session], store: BlobStore, headers: HeaderDictionaries) -> None:
        self._session_factory = session_factory
        self.store = store
        self.headers = headers  # header (de)compression with the archive's dictionaries

    def read_header(self, header_blob: str, dictionary: str | None) -> bytes:
        """An instance's header blob, decompressed: a Part 10 file without Pixel Data."""
        return self.headers.read_header(self.session, header_blob, dictionary)

    def __enter__(self) -> Self:
        self.session = self._session_factory()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.session.rollback()  # a no-op after commit()
        self.session.close()

    def commit(self) -> None:
        self.session.commit()

    def rollback(self) -> None:
        self.session.rollback()
