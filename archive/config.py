"""One place for configuration: ``MEDARCHIVE_*`` variables over an optional TOML file.

Precedence, highest first: keyword overrides, environment variables, the TOML
file (``MEDARCHIVE_CONFIG``, else ``$MEDARCHIVE_HOME/medarchive.toml``),
built-in defaults. No secret has a default; a database password can come from
a file (``MEDARCHIVE_DATABASE_PASSWORD_FILE``, for Docker secrets). Every scalar setting ``name`` is
read from ``MEDARCHIVE_NAME`` or the TOML key ``name``.

Example ``medarchive.toml``::

    database_url = "postgresql+psycopg://archive@db/medarchive"
    broker_url = "redis://redis:6379/0"
    stable_age = 60
    [codec]
    id = "jpegls"
    [policies.ct-to-jpegxl]          # scheduled re-compression (``medarchive recompress``)
    codec = { id = "jpegxl", effort = 7 }
    modalities = ["CT"]
    from_codecs = ["jpegls"]
    archived_before_days = 30
    window = "01:00-05:00"
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from datetime import time as clock_time
from pathlib import Path
from typing import Any, Iterable, Mapping

import platformdirs

from archive.clock import local_time_now
from archive.errors import ConfigError
from archive.normalize.profiles import DEFAULT_PROFILES, NormalizeProfile, parse_profiles


def default_home() -> Path:
    """The per-user data folder (``~/.local/share/medarchive`` on Linux): the same archive from any folder."""
    return Path(platformdirs.user_data_dir("medarchive", appauthor=False))


# MEDARCHIVE_* variables that are not settings fields but are read somewhere (CLI, tests, benchmarks)
_OTHER_ENVIRONMENT = frozenset({
    "CONFIG", "DATABASE_PASSWORD_FILE", "API_TOKEN_FILE", "DEBUG",
    "FAULT_KILL", "FAULT_DELAY",  # test-only fault switches (archive/services/deadlines.py)
    "TEST_POSTGRES_URL", "BENCH_POSTGRES_URL", "SHARED_DATA", "CHROMIUM", "CHROMEDRIVER",  # tests and benchmarks
})


@dataclass(frozen=True)
class RecompressPolicy:
    """Which studies move to which codec, when, and how fast.

    Selection: current codec in ``from_codecs`` (empty: any lossless codec),
    Modality in ``modalities`` (empty: any), StudyDate before
    ``study_date_before`` (YYYYMMDD) and/or archived more than
    ``archived_before_days`` ago. ``max_error`` is the largest per-pixel error
    the new encoding may have against the original (0: lossless; a lossy
    target's codec promises its own bound, which is always checked).

    A lossy target (a codec configuration that is not lossless) never
    replaces the original in place: it makes a lossy representation, a
    derived series with new UIDs marked as lossy. ``keep_lossless`` (default
    true) keeps the lossless original; only with false is it released.
    ``min_psnr`` is a quality floor: an instance whose lossy encoding falls
    below it (or beyond ``max_error``) stays lossless, and the job says why.
    """

    name: str
    codec: dict[str, Any]
    modalities: tuple[str, ...] = ()
    from_codecs: tuple[str, ...] = ()
    study_date_before: str | None = None
    archived_before_days: float | None = None
    max_error: float = 0.0
    keep_lossless: bool = True
    min_psnr: float | None = None
    window: str | None = None  # "HH:MM-HH:MM" local time; may wrap midnight; None = always
    batch_size: int = 200  # instances per sweep (the throttle)
    interval: float = 600.0  # seconds between scheduled sweeps

    def window_bounds(self) -> tuple[clock_time, clock_time] | None:
        if not self.window:
            return None
        try:
            start, end = (clock_time.fromisoformat(part.strip()) for part in self.window.split("-"))
        except ValueError as exc:
            raise ConfigError(f"policy {self.name}: window must look like 01:00-05:00, not {self.window!r}") from exc
        return start, end

    def in_window(self, now: clock_time | None = None) -> bool:
        """Whether ``now`` (default: the local time of day) falls in the window; no window is always open."""
        bounds = self.window_bounds()
        if bounds is None:
            return True
        start, end = bounds
        if now is None:
            now = local_time_now()
        return start <= now < end if start <= end else (now >= start or now < end)


@dataclass(frozen=True)
class Settings:
    """Everything medarchive needs to know about where it lives and what it does."""

    home: Path
    database_url: str
    codec: dict[str, Any] = field(default_factory=lambda: {"id": "jpegls"})
    header_zstd_level: int = 9
    # --- the batch service ---
    broker_url: str = ""  # default: kombu's SQLAlchemy transport on SQLite under home
    result_backend: str = ""  # default: Redis when the broker is Redis, else SQLite under home
    queue: str = "medarchive"
    learned_queue: str = "medarchive-learned"  # tasks whose codec runs a learned model (archive.kinds.Lane)
    visibility_timeout: float = 900.0  # seconds before Redis redelivers an unacknowledged task
    task_time_limit: float = 600.0  # hard limit for one task (a chunk of instances)
    instance_time_limit: float = 120.0  # limit for one instance inside a task
    chunk_size: int = 32  # most instances per task; a big series is split, small series of a study share one
    max_attempts: int = 2  # tries of one instance that killed its worker before it is quarantined
    max_deliveries: int = 10  # deliveries of one task before its leftovers are quarantined
    requeue_after: float = 900.0  # a queued task not started after this long is re-dispatched
    reconcile_interval: float = 60.0
    stable_age: float = 60.0  # seconds without a new instance before a study is queued (Orthanc StableAge)
    file_settle: float = 2.0  # seconds a file's size and mtime must stay unchanged
    rescan_interval: float = 30.0
    verify_interval: float = 86400.0  # beat: re-hash every blob (0 disables)
    gc_interval: float = 86400.0  # beat: remove unreferenced blobs (0 disables)
    gc_grace: float = 86400.0  # an unreferenced blob younger than this is kept
    policies: dict[str, RecompressPolicy] = field(default_factory=dict)
    # --- normalization (archive/normalize/profiles.py) ---
    normalize: bool = True  # MEDARCHIVE_NORMALIZE=off, or [normalize] enabled = false
    normalize_profiles: tuple[NormalizeProfile, ...] = DEFAULT_PROFILES
    normalize_interval: float = 3600.0  # beat: normalize archived series that lack a current one (0 disables)
    normalize_batch: int = 50  # most series one scheduled sweep normalizes
    # --- the server (medarchive serve: DICOMweb, the web page) ---
    # name -> bearer token; several, so one can be rotated without stopping the others.
    # MEDARCHIVE_API_TOKEN="TOKEN" (named "default") or "name=TOKEN,name2=TOKEN2"; TOML: api_tokens = { name = "TOKEN" }
    api_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    api_max_upload_bytes: int = 2 * 1024**3  # one STOW-RS request; larger answers 413
    api_tls_proxy: bool = False  # behind a TLS-terminating proxy: plain HTTP on a non-loopback address is allowed

    # --- the DICOM network service (medarchive scp: DIMSE C-ECHO, C-STORE, storage commitment, C-FIND/GET/MOVE) ---
    scp_enabled: bool = False  # `medarchive run` and docker-compose start the SCP too
    scp_aet: str = "MEDARCHIVE"
    scp_host: str = "0.0.0.0"
    scp_port: int = 11112
    # calling AEs accepted: "AE" (from any address) or "AE@host"; none configured: only callers on loopback
    # MEDARCHIVE_SCP_ALLOW="PACS1,CT7@10.0.4.21"; TOML: scp_allow = ["PACS1", "CT7@10.0.4.21"]
    scp_allow: tuple[str, ...] = ()
    # AE title -> "host:port": C-MOVE destinations, and where storage commitment results go on a new association
    # MEDARCHIVE_SCP_DESTINATIONS="VIEWER=10.0.4.30:104,CT7=10.0.4.21:104"; TOML: [scp_destinations] VIEWER = "..."
    scp_destinations: dict[str, str] = field(default_factory=dict)
    scp_derived_aes: tuple[str, ...] = ()  # calling AEs that also see derived series (normalized, lossy): C-FIND,
    # and in C-GET/C-MOVE of a whole study or patient
    scp_min_free_bytes: int = 1024**3  # below this much free space in the home, C-STORE answers 0xA700
    scp_max_dataset_bytes: int = 2 * 1024**3  # a larger data set closes its association
    scp_max_associations: int = 32
    scp_tls_cert: str = ""  # PEM certificate and key: the SCP speaks DICOM TLS (PS3.15 B.1) only
    scp_tls_key: str = ""
    scp_tls_ca: str = ""  # with it, callers must present a certificate this CA signed
    scp_commit_timeout: float = 3600.0  # storage commitment: seconds to wait for instances to be archived

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Where the SCP writes what it receives until the study is stable and spooled."""
        return self.home / "incoming"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.sqlite'}"

    @property
    def effective_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.effective_broker_url.startswith(("redis://", "rediss://")):
            return self.effective_broker_url
        return f"db+sqlite:///{self.home / 'results.sqlite'}"

    def policy(self, name: str) -> RecompressPolicy:
        try:
            return self.policies[name]
        except KeyError:
            known = ", ".join(sorted(self.policies)) or "none configured"
            raise ConfigError(f"no re-compression policy {name!r} (known: {known})") from None

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment and the TOML file; keyword overrides win over both."""
        env = os.environ if environ is None else environ
        home = Path(overrides.get("home") or env.get("MEDARCHIVE_HOME") or default_home()).absolute()
        file_values = _read_toml(env.get("MEDARCHIVE_CONFIG"), home)
        database_url = (
            overrides.get("database_url")
            or env.get("MEDARCHIVE_DATABASE_URL")
            or file_values.get("database_url")
            or f"sqlite:///{home / 'catalog.sqlite'}"
        )
        password_file = env.get("MEDARCHIVE_DATABASE_PASSWORD_FILE") or file_values.get("database_password_file")
        if password_file:
            database_url = _with_password(str(database_url), Path(password_file))
        codec = overrides.get("codec") or _codec_from_env(env) or file_values.get("codec")
        codec = dict(codec) if codec else {"id": "jpegls"}
        if "id" not in codec:
            raise ConfigError(f"codec configuration needs an 'id': {codec!r}")
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name in ("home", "database_url", "codec", "policies", "normalize", "normalize_profiles",
                             "api_tokens", "api_tls_proxy"):
                continue
            raw = overrides.get(spec.name)
            if raw is None:
                raw = env.get(f"MEDARCHIVE_{spec.name.upper()}")
            if raw is None:
                raw = file_values.get(spec.name)
            if raw is not None:
                values[spec.name] = _coerce(spec.name, spec.type, raw)
        policies = overrides.get("policies")
        if policies is None:
            policies = _policies(file_values.get("policies", {}))
        file_enabled, profiles = parse_profiles(file_values.get("normalize", {}))
        values["normalize_profiles"] = overrides.get("normalize_profiles") or profiles
        switch = overrides.get("normalize")
        if switch is None:
            switch = _switch("MEDARCHIVE_NORMALIZE", env["MEDARCHIVE_NORMALIZE"]) if env.get("MEDARCHIVE_NORMALIZE") \
                else file_enabled
        values["normalize"] = True if switch is None else bool(switch)
        values["api_tokens"] = overrides.get("api_tokens") or parse_api_tokens(
            env.get("MEDARCHIVE_API_TOKEN") or _read_secret(env.get("MEDARCHIVE_API_TOKEN_FILE")),
            file_values.get("api_tokens"))
        proxy = overrides.get("api_tls_proxy")
        if proxy is None:
            raw_proxy = env.get("MEDARCHIVE_API_TLS_PROXY")
            proxy = _switch("MEDARCHIVE_API_TLS_PROXY", raw_proxy) if raw_proxy else file_values.get("api_tls_proxy")
        values["api_tls_proxy"] = bool(proxy)
        level = values.get("header_zstd_level", 9)
        if not 1 <= level <= 22:  # whole objects record it as a zstd codec config, which takes 1..22
            raise ConfigError(f"header_zstd_level must be between 1 and 22, not {level}")
        return cls(home=home, database_url=str(database_url), codec=codec, policies=policies, **values)


def _read_secret(path: str | None) -> str | None:
    """A secret kept in a file (a Docker secret, ``MEDARCHIVE_API_TOKEN_FILE``): its text without the newline."""
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror or exc}") from exc


def parse_api_tokens(env_value: str | None, file_value: Any) -> dict[str, str]:
    """Named API tokens: the environment's (``TOKEN`` or ``name=TOKEN,...``) over the TOML table's."""
    tokens: dict[str, str] = {}
    if env_value:
        for item in (part.strip() for part in env_value.split(",")):
            if not item:
                continue
            name, sep, token = item.partition("=")
            name, token = (name.strip(), token.strip()) if sep else ("default", name.strip())
            tokens[name] = token
    elif file_value is not None:
        if not isinstance(file_value, Mapping) or not all(isinstance(v, str) for v in file_value.values()):
            raise ConfigError("api_tokens must be a table of name = \"token\" strings")
        tokens = {str(k): v for k, v in file_value.items()}
    for name, token in tokens.items():
        if not name or len(token) < 16:
            raise ConfigError(f"API token {name or '(unnamed)'!r} is too short: use at least 16 characters "
                              "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return tokens


def _switch(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be on or off, not {raw!r}")


def known_environment() -> frozenset[str]:
    """Every ``MEDARCHIVE_*`` variable medarchive or its tests read."""
    settings = {f"MEDARCHIVE_{spec.name.upper()}" for spec in fields(Settings)
                if spec.name not in ("policies", "normalize_profiles", "api_tokens")} | {"MEDARCHIVE_API_TOKEN"}
    return frozenset(settings | {f"MEDARCHIVE_{name}" for name in _OTHER_ENVIRONMENT})


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for ``MEDARCHIVE_*`` variables nothing reads (a typo would otherwise be ignored silently)."""
    env = os.environ if environ is None else environ
    known = known_environment()
    warnings = []
    for name in sorted(n for n in env if n.startswith("MEDARCHIVE_") and n not in known):
        hint = _suggest(name.removeprefix("MEDARCHIVE_"), {k.removeprefix("MEDARCHIVE_") for k in known})
        hint = hint.replace("did you mean ", "did you mean MEDARCHIVE_")
        warnings.append(f"unknown environment variable {name} is ignored{hint}")
    return warnings


def _suggest(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _check_file_keys(values: Mapping[str, Any], path: Path) -> None:
    """An unknown top-level key in the TOML file is an error: a typo must not silently keep a default."""
    known = {spec.name for spec in fields(Settings)} - {"home", "normalize_profiles"} | {"database_password_file"}
    if "home" in values:
        raise ConfigError(f"{path}: the home cannot be set in its own configuration file; set MEDARCHIVE_HOME")
    for key in values:
        if key not in known:
            hint = _suggest(key, known) or f" (known keys: {', '.join(sorted(known))})"
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")


def _with_password(url: str, password_file: Path) -> str:
    """A password kept in a file (a Docker secret) joins the URL in memory only."""
    from sqlalchemy.engine import make_url

    try:
        password = password_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the database password file {password_file}: {exc}") from exc
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    kind = str(kind)
    if kind == "bool":
        return _switch(f"MEDARCHIVE_{name.upper()}", raw) if isinstance(raw, str) else bool(raw)
    if kind == "tuple[str, ...]":
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name} must be a list of strings or a comma-separated string, not {raw!r}")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if kind == "dict[str, str]":
        return _string_table(name, raw)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}, not {raw!r}") from exc


def _string_table(name: str, raw: Any) -> dict[str, str]:
    """``"key=value,key2=value2"`` (the environment) or a TOML table of strings."""
    if isinstance(raw, str):
        table: dict[str, str] = {}
        for item in (part.strip() for part in raw.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ConfigError(f"{name} must look like KEY=VALUE,KEY2=VALUE2, not {raw!r}")
            table[key.strip()] = value.strip()
        return table
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
        raise ConfigError(f"{name} must be a table of key = \"value\" strings")
    return {str(k): v for k, v in raw.items()}


def _policies(table: Mapping[str, Any]) -> dict[str, RecompressPolicy]:
    if not isinstance(table, Mapping):
        raise ConfigError("[policies] must be a table of named policies")
    policies: dict[str, RecompressPolicy] = {}
    known = {f.name for f in fields(RecompressPolicy)}
    for name, raw in table.items():
        if not isinstance(raw, Mapping) or "codec" not in raw:
            raise ConfigError(f"policy {name!r} needs a codec table, e.g. codec = {{ id = \"jpegxl\" }}")
        unknown = sorted(set(raw) - known - {"name"})
        if unknown or "name" in raw:
            key = unknown[0] if unknown else "name"
            hint = _suggest(key, known - {"name"}) or f" (known: {', '.join(sorted(known - {'name'}))})"
            raise ConfigError(f"policy {name!r}: unknown key {key!r}{hint}")
        codec = raw["codec"]
        if isinstance(codec, str):
            codec = {"id": codec}
        values = dict(raw)
        values["codec"] = dict(codec)
        for key in ("modalities", "from_codecs"):
            if key in values:
                values[key] = tuple(str(v) for v in values[key])
        policy = RecompressPolicy(name=name, **values)
        policy.window_bounds()  # validate early
        policies[name] = policy
    return policies


def parse_codec_spec(text: str, *, source: str = "codec") -> dict[str, Any]:
    """A codec configuration from text: a JSON object (``{"id": "jpegxl", "effort": 7}``) or a bare id (``jpegxl``).

    ``source`` names where the text came from (``--codec``, ``MEDARCHIVE_CODEC``) in the
    :class:`ConfigError` raised for empty text, bad JSON, or JSON that is not an object.
    """
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"{source} is empty: give a codec id (e.g. jpegxl) or a JSON object")
    if stripped[0] in "{[\"" or stripped[0].isdigit():
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} is not valid JSON ({exc}): {text!r}") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{source} must be a JSON object or a codec id, not {text!r}")
        if not isinstance(value.get("id"), str) or not value["id"].strip():
            raise ConfigError(f"{source} needs a codec 'id', e.g. {{\"id\": \"jpegxl\"}}: {text!r}")
        return value
    if any(c.isspace() for c in stripped):
        raise ConfigError(f"{source} must be a JSON object or a codec id, not {text!r}")
    return {"id": stripped}


def _codec_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    raw = env.get("MEDARCHIVE_CODEC")
    if not raw:
        return None
    return parse_codec_spec(raw, source="MEDARCHIVE_CODEC")


def _read_toml(explicit: str | None, home: Path) -> dict[str, Any]:
    path = Path(explicit) if explicit else home / "medarchive.toml"
    if not path.exists():
        if explicit:
            raise ConfigError(f"MEDARCHIVE_CONFIG points to a missing file: {path}")
        return {}
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror or exc}") from exc
    _check_file_keys(values, path)
    return values
