"""The unit of work: one transaction and the blob store, rolled back unless committed."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from sqlalchemy.orm import Session, sessionmaker

from archive.store import BlobStore


class UnitOfWork:
    session: Session

    def __init__(self, session_factory: sessionmaker[Session], store: BlobStore) -> None:
        self._session_factory = session_factory
        self.store = store

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
