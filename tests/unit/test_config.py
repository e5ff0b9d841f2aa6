"""Settings: environment over TOML file over defaults; malformed input is a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from archive.config import Settings, parse_codec_spec
from archive.errors import ConfigError


def _toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_sqlite_under_home(tmp_path: Path) -> None:
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path / "h")})
    assert settings.home == (tmp_path / "h").absolute()
    assert settings.database_url == f"sqlite:///{tmp_path / 'h' / 'catalog.sqlite'}"
    assert settings.is_sqlite
    assert settings.codec == {"id": "jpegls"}
    assert settings.header_zstd_level == 9
    assert settings.blob_dir == settings.home / "blobs"
    assert settings.quarantine_dir == settings.home / "quarantine"


def test_default_home_is_the_per_user_data_folder_wherever_it_runs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the current folder: `medarchive studies` run elsewhere must find the same archive."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # platformdirs' per-user data folder on Linux
    homes = set()
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        homes.add(Settings.load(environ={}).home)
    assert homes == {tmp_path / "xdg" / "medarchive"}
    settings = Settings.load(environ={})
    assert settings.database_url == f"sqlite:///{tmp_path / 'xdg' / 'medarchive' / 'catalog.sqlite'}"
    assert Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path / "mine")}).home == tmp_path / "mine"


def test_relative_home_from_env_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.load(environ={"MEDARCHIVE_HOME": "rel"})
    assert settings.home == tmp_path / "rel"


def test_toml_in_home_overrides_defaults(tmp_path: Path) -> None:
    home = tmp_path / "h"
    _toml(home / "medarchive.toml", 'database_url = "postgresql+psycopg://u@db/x"\nheader_zstd_level = 3\n'
                                    '[codec]\nid = "jpegxl"\neffort = 7\n')
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(home)})
    assert settings.database_url == "postgresql+psycopg://u@db/x"
    assert not settings.is_sqlite
    assert settings.codec == {"id": "jpegxl", "effort": 7}
    assert settings.header_zstd_level == 3


def test_env_overrides_toml(tmp_path: Path) -> None:
    config = _toml(tmp_path / "elsewhere" / "conf.toml",
                   'database_url = "postgresql+psycopg://file@db/x"\nheader_zstd_level = 3\n[codec]\nid = "jpegxl"\n')
    env = {
        "MEDARCHIVE_HOME": str(tmp_path / "h"),
        "MEDARCHIVE_CONFIG": str(config),
        "MEDARCHIVE_DATABASE_URL": "sqlite:////tmp/env.sqlite",
        "MEDARCHIVE_CODEC": "zstd",
        "MEDARCHIVE_HEADER_ZSTD_LEVEL": "5",
    }
    settings = Settings.load(environ=env)
    assert settings.database_url == "sqlite:////tmp/env.sqlite"
    assert settings.codec == {"id": "zstd"}
    assert settings.header_zstd_level == 5


def test_medarchive_config_points_to_a_toml_file(tmp_path: Path) -> None:
    home = tmp_path / "h"
    _toml(home / "medarchive.toml", '[codec]\nid = "from-home"\n')
    config = _toml(tmp_path / "conf.toml", '[codec]\nid = "jpeg2000"\nlevel = 2\n')
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(home), "MEDARCHIVE_CONFIG": str(config)})
    assert settings.codec == {"id": "jpeg2000", "level": 2}, "MEDARCHIVE_CONFIG wins over the home file"


def test_codec_env_as_json(tmp_path: Path) -> None:
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_CODEC": ' {"id": "jpegxl", "effort": 3}'})
    assert settings.codec == {"id": "jpegxl", "effort": 3}


def test_keyword_overrides_win(tmp_path: Path) -> None:
    env = {"MEDARCHIVE_HOME": str(tmp_path / "env"), "MEDARCHIVE_DATABASE_URL": "sqlite:////tmp/env.sqlite",
           "MEDARCHIVE_CODEC": "zstd"}
    settings = Settings.load(environ=env, home=tmp_path / "kw", database_url="sqlite:////tmp/kw.sqlite",
                             codec={"id": "jpeg2000"})
    assert settings.home == tmp_path / "kw"
    assert settings.database_url == "sqlite:////tmp/kw.sqlite"
    assert settings.codec == {"id": "jpeg2000"}


def test_environ_none_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDARCHIVE_HOME", str(tmp_path / "osenv"))
    monkeypatch.delenv("MEDARCHIVE_CONFIG", raising=False)
    monkeypatch.delenv("MEDARCHIVE_DATABASE_URL", raising=False)
    monkeypatch.delenv("MEDARCHIVE_CODEC", raising=False)
    assert Settings.load().home == tmp_path / "osenv"


@pytest.mark.parametrize("raw", ['{"id": ', "{not json}", '{"id": "x",}'])
def test_malformed_codec_json(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match="MEDARCHIVE_CODEC"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_CODEC": raw})


def test_codec_json_must_be_an_object_with_an_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_CODEC": '{"effort": 7}'})


@pytest.mark.parametrize("text", ["database_url = ", "[codec\nid = 'x'", "a = 1\na = 2\n", "key = 'unterminated\n"])
def test_malformed_toml(tmp_path: Path, text: str) -> None:
    config = _toml(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match="bad.toml"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_CONFIG": str(config)})
    home = tmp_path / "home"
    _toml(home / "medarchive.toml", text)
    with pytest.raises(ConfigError):
        Settings.load(environ={"MEDARCHIVE_HOME": str(home)})


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_CONFIG": str(tmp_path / "nope.toml")})


def test_codec_table_without_id(tmp_path: Path) -> None:
    home = tmp_path / "h"
    _toml(home / "medarchive.toml", "[codec]\neffort = 7\n")
    with pytest.raises(ConfigError, match="id"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(home)})


def test_malformed_header_zstd_level(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_HEADER_ZSTD_LEVEL": "nine"})


@pytest.mark.parametrize("level", ["0", "-1", "23"])
def test_header_zstd_level_outside_what_zstd_configs_take(tmp_path: Path, level: str) -> None:
    """Whole objects record the level in a zstd codec config, which must stay a recipe get_codec accepts."""
    with pytest.raises(ConfigError, match="between 1 and 22"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_HEADER_ZSTD_LEVEL": level})


def test_service_settings_from_environment_and_file(tmp_path: Path) -> None:
    home = tmp_path / "h"
    _toml(home / "medarchive.toml", 'broker_url = "redis://file:6379/0"\nstable_age = 30\nchunk_size = 16\n'
          '[policies.old-ct]\ncodec = { id = "jpegxl", effort = 7 }\nmodalities = ["CT"]\n'
          'from_codecs = ["jpegls"]\narchived_before_days = 365\nwindow = "01:00-05:00"\n')
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(home), "MEDARCHIVE_STABLE_AGE": "5"})
    assert settings.stable_age == 5.0 and settings.chunk_size == 16
    assert settings.effective_broker_url == "redis://file:6379/0"
    assert settings.effective_result_backend == "redis://file:6379/0"
    policy = settings.policy("old-ct")
    assert policy.codec == {"id": "jpegxl", "effort": 7} and policy.modalities == ("CT",)
    assert policy.archived_before_days == 365


def test_embedded_broker_is_the_default(tmp_path: Path) -> None:
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path)})
    assert settings.effective_broker_url == f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    assert settings.effective_result_backend.startswith("db+sqlite:///")


@pytest.mark.parametrize("body, message", [
    ('[policies.p]\nmodalities = ["CT"]\n', "needs a codec"),
    ('[policies.p]\ncodec = "zstd"\nspeed = 3\n', "unknown key 'speed'"),
    ('[policies.p]\ncodec = "zstd"\nbatchsize = 3\n', "did you mean batch_size"),
    ('[policies.p]\ncodec = "zstd"\nwindow = "late"\n', "window"),
    ('chunk_size = "many"\n', "chunk_size"),
])
def test_bad_service_settings_are_clear_errors(tmp_path: Path, body: str, message: str) -> None:
    _toml(tmp_path / "medarchive.toml", body)
    with pytest.raises(ConfigError, match=message):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path)})


def test_unknown_policy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no re-compression policy 'x'"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path)}).policy("x")


def test_database_password_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "db_password"
    secret.write_text("s3cr/t@x\n")
    settings = Settings.load(environ={
        "MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_DATABASE_URL": "postgresql+psycopg://archive@db:5432/m",
        "MEDARCHIVE_DATABASE_PASSWORD_FILE": str(secret)})
    from sqlalchemy.engine import make_url

    assert make_url(settings.database_url).password == "s3cr/t@x"
    with pytest.raises(ConfigError, match="password file"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_DATABASE_URL": "postgresql://a@b/c",
                               "MEDARCHIVE_DATABASE_PASSWORD_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(("text", "expected"), [
    ("jpegxl", {"id": "jpegxl"}),
    ("  zstd\n", {"id": "zstd"}),
    ('{"id": "jpegxl", "effort": 7}', {"id": "jpegxl", "effort": 7}),
    (' {"id": "jpeg2000", "level": 2}', {"id": "jpeg2000", "level": 2}),
])
def test_parse_codec_spec_accepts_an_id_or_a_json_object(text: str, expected: dict[str, object]) -> None:
    assert parse_codec_spec(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"), ("   ", "empty"), ("{bad", "not valid JSON"), ('{"id": "x",}', "not valid JSON"),
    ('["jpegxl"]', "JSON object"), ('"jpegxl"', "JSON object"), ("7", "JSON object"),
    ('{"effort": 7}', "'id'"), ('{"id": ""}', "'id'"), ("jpeg xl", "codec id"),
])
def test_parse_codec_spec_errors_name_their_source(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="--codec") as raised:
        parse_codec_spec(text, source="--codec")
    assert message in str(raised.value)


def test_codec_env_as_a_bare_id_goes_through_the_same_parser(tmp_path: Path) -> None:
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_CODEC": " jpegxl "})
    assert settings.codec == {"id": "jpegxl"}
    with pytest.raises(ConfigError, match="MEDARCHIVE_CODEC.*JSON object"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), "MEDARCHIVE_CODEC": "[1, 2]"})


@pytest.mark.parametrize(("body", "key", "hint"), [
    ("stabel_age = 5\n", "stabel_age", "did you mean stable_age?"),
    ('brokerurl = "redis://x"\n', "brokerurl", "did you mean broker_url?"),
    ("zzz = 1\n", "zzz", "known keys: "),
    ('[codecs]\nid = "zstd"\n', "codecs", "did you mean codec?"),
])
def test_unknown_toml_key_is_an_error_naming_key_file_and_the_closest_known(
        tmp_path: Path, body: str, key: str, hint: str) -> None:
    config = _toml(tmp_path / "medarchive.toml", body)
    with pytest.raises(ConfigError) as raised:
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path)})
    message = str(raised.value)
    assert f"'{key}'" in message and str(config) in message and hint in message


def test_every_documented_toml_key_is_accepted(tmp_path: Path) -> None:
    """The [codec] table is free-form codec configuration; database_password_file is a key too."""
    secret = _toml(tmp_path / "pw", "pw\n")
    _toml(tmp_path / "medarchive.toml", f'database_url = "postgresql+psycopg://a@db/m"\n'
          f'database_password_file = "{secret}"\nstable_age = 5\nqueue = "q"\ngc_grace = 1\n'
          '[codec]\nid = "jpegxl"\nanything_the_codec_takes = 3\n'
          '[policies.p]\ncodec = "zstd"\n')
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path)})
    assert settings.stable_age == 5 and settings.codec["anything_the_codec_takes"] == 3


def test_home_cannot_be_set_in_its_own_file(tmp_path: Path) -> None:
    _toml(tmp_path / "medarchive.toml", 'home = "/elsewhere"\n')
    with pytest.raises(ConfigError, match="MEDARCHIVE_HOME"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path)})


def test_unknown_environment_variables_are_named_with_a_suggestion() -> None:
    from archive.config import unknown_environment

    env = {"MEDARCHIVE_STABEL_AGE": "5", "MEDARCHIVE_HOME": "/x", "MEDARCHIVE_DEBUG": "1", "PATH": "/bin",
           "MEDARCHIVE_FAULT_KILL": "", "MEDARCHIVE_TEST_POSTGRES_URL": "", "MEDARCHIVE_CHUNK_SIZE": "3",
           "MEDARCHIVE_NONSENSE_XYZZY": "1", "MEDARCHIVE_DATABASE_PASSWORD_FILE": "/run/secrets/pw"}
    warnings = unknown_environment(env)
    assert len(warnings) == 2
    assert "MEDARCHIVE_NONSENSE_XYZZY" in warnings[0] and "did you mean" not in warnings[0]
    assert "MEDARCHIVE_STABEL_AGE" in warnings[1] and "did you mean MEDARCHIVE_STABLE_AGE?" in warnings[1]
    env.pop("MEDARCHIVE_DATABASE_PASSWORD_FILE")
    assert Settings.load(environ=env).stable_age == 60.0  # ignored, and loading stays silent about it


def test_every_medarchive_variable_the_repository_reads_is_known() -> None:
    """A variable a test, benchmark or compose file sets must not draw the unknown-variable warning."""
    import re

    from archive.config import known_environment
    from tests.conftest import REPO

    used: set[str] = set()
    for pattern in ("archive/**/*.py", "workers/*.py", "tests/**/*.py", "benchmarks/**/*.py", "docker-compose.yml",
                    "Dockerfile", ".ci/run"):
        for path in REPO.glob(pattern):
            used |= set(re.findall(r"MEDARCHIVE_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")))
    # names that are prefixes, examples in prose or the implementation version string, not variables
    used -= {"MEDARCHIVE_01", "MEDARCHIVE_FAULT", "MEDARCHIVE_NAME", "MEDARCHIVE_STABEL_AGE", "MEDARCHIVE_NONSENSE_XYZZY"}
    # Lossy Image Compression Method names (archive.services.lossy.lossy_method), not variables
    used = {name for name in used if not name.startswith(("MEDARCHIVE_PCA", "MEDARCHIVE_KMEANS", "MEDARCHIVE_BOUNDED"))}
    assert used - known_environment() == set()


def test_scp_settings_from_environment_and_file(tmp_path: Path) -> None:
    home = tmp_path / "h"
    _toml(home / "medarchive.toml", 'scp_allow = ["PACS1", "CT7@10.0.4.21"]\nscp_port = 104\n'
          '[scp_destinations]\nVIEWER = "10.0.4.30:104"\n')
    settings = Settings.load(environ={"MEDARCHIVE_HOME": str(home), "MEDARCHIVE_SCP_ENABLED": "on",
                                      "MEDARCHIVE_SCP_DERIVED_AES": "RESEARCH, AI1"})
    assert settings.scp_allow == ("PACS1", "CT7@10.0.4.21") and settings.scp_port == 104
    assert settings.scp_destinations == {"VIEWER": "10.0.4.30:104"} and settings.scp_enabled is True
    assert settings.scp_derived_aes == ("RESEARCH", "AI1") and settings.scp_aet == "MEDARCHIVE"
    from_env = Settings.load(environ={"MEDARCHIVE_HOME": str(home), "MEDARCHIVE_SCP_ALLOW": "A,B@h",
                                      "MEDARCHIVE_SCP_DESTINATIONS": "V=1.2.3.4:11112,W=h:104"})
    assert from_env.scp_allow == ("A", "B@h") and from_env.scp_destinations == {"V": "1.2.3.4:11112", "W": "h:104"}
    with pytest.raises(ConfigError, match="MEDARCHIVE_SCP_ENABLED must be on or off"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(home), "MEDARCHIVE_SCP_ENABLED": "maybe"})
    with pytest.raises(ConfigError, match="scp_destinations must look like"):
        Settings.load(environ={"MEDARCHIVE_HOME": str(home), "MEDARCHIVE_SCP_DESTINATIONS": "VIEWER"})
