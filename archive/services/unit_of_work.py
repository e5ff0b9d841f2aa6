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

    def __init__(
        self, session_factory: sessionmaker[Session], store: BlobStore, headers: HeaderDictionaries | None = None
    ) -> None:
        self._session_factory = session_factory
        self.store = store
        self._headers = headers

    @property
    def headers(self) -> HeaderDictionaries:
        """Header (de)compression with the archive's dictionaries."""
        if self._headers is None:
            from archive.services.header_dictionaries import HeaderDictionaries  # noqa: PLC0415

            self._headers = HeaderDictionaries(self._session_factory, self.store, 9)
        return self._headers

    def read_header(self, instance_header_blob: str, dictionary: str | None) -> bytes:
        """An instance's header blob, decompressed: a Part 10 file without Pixel Data."""
        from archive.services.blobs import read_blob  # noqa: PLC0415

        return self.headers.decompress(self.session, read_blob(self.session, self.store, instance_header_blob), dictionary)

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
