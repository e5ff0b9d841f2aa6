"""One place for configuration: ``MEDARCHIVE_*`` variables over an optional TOML file.

Precedence, highest first: environment variables, the TOML file
(``MEDARCHIVE_CONFIG``, else ``$MEDARCHIVE_HOME/medarchive.toml``), built-in
defaults. No secret has a default.

Example ``medarchive.toml``::

    database_url = "postgresql+psycopg://archive@db/medarchive"
    [codec]
    id = "jpegxl"
    effort = 7
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from archive.errors import ConfigError

DEFAULT_HOME = "./medarchive-data"


@dataclass(frozen=True)
class Settings:
    """Everything medarchive needs to know about where it lives and what it does."""

    home: Path
    database_url: str
    codec: dict[str, Any] = field(default_factory=lambda: {"id": "jpegls"})
    header_zstd_level: int = 9

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment and the TOML file; keyword overrides win over both."""
        env = os.environ if environ is None else environ
        home = Path(overrides.get("home") or env.get("MEDARCHIVE_HOME") or DEFAULT_HOME).absolute()
        file_values = _read_toml(env.get("MEDARCHIVE_CONFIG"), home)
        database_url = (
            overrides.get("database_url")
            or env.get("MEDARCHIVE_DATABASE_URL")
            or file_values.get("database_url")
            or f"sqlite:///{home / 'catalog.sqlite'}"
        )
        codec = overrides.get("codec") or _codec_from_env(env) or file_values.get("codec")
        codec = dict(codec) if codec else {"id": "jpegls"}
        if "id" not in codec:
            raise ConfigError(f"codec configuration needs an 'id': {codec!r}")
        raw_level = env.get("MEDARCHIVE_HEADER_ZSTD_LEVEL") or file_values.get("header_zstd_level", 9)
        try:
            level = int(raw_level)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"header_zstd_level must be an integer, not {raw_level!r}") from exc
        return cls(home=home, database_url=str(database_url), codec=codec, header_zstd_level=level)


def _codec_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    raw = env.get("MEDARCHIVE_CODEC")
    if not raw:
        return None
    if raw.lstrip().startswith("{"):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"MEDARCHIVE_CODEC is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ConfigError("MEDARCHIVE_CODEC must be a JSON object or a codec id")
        return value
    return {"id": raw.strip()}


def _read_toml(explicit: str | None, home: Path) -> dict[str, Any]:
    path = Path(explicit) if explicit else home / "medarchive.toml"
    if not path.exists():
        if explicit:
            raise ConfigError(f"MEDARCHIVE_CONFIG points to a missing file: {path}")
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
