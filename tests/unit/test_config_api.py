"""The server's settings: named API tokens from the environment, a secret file or the TOML file; TLS proxy; upload limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from archive.config import Settings, known_environment, parse_api_tokens
from archive.errors import ConfigError

A = "a-token-0123456789abcdef"
B = "b-token-0123456789abcdef"


def _load(tmp_path: Path, toml: str | None = None, **env: str) -> Settings:
    if toml is not None:
        (tmp_path / "medarchive.toml").write_text(toml)
    return Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), **env})


def test_one_token_is_named_default_and_several_are_named(tmp_path: Path) -> None:
    assert _load(tmp_path, MEDARCHIVE_API_TOKEN=A).api_tokens == {"default": A}
    assert _load(tmp_path, MEDARCHIVE_API_TOKEN=f"pacs={A}, viewer = {B},").api_tokens == {"pacs": A, "viewer": B}
    assert _load(tmp_path).api_tokens == {}


def test_the_toml_table_is_read_and_the_environment_wins_over_it(tmp_path: Path) -> None:
    toml = f'api_tokens = {{ pacs = "{A}", viewer = "{B}" }}\napi_max_upload_bytes = 1000\napi_tls_proxy = true\n'
    settings = _load(tmp_path, toml)
    assert settings.api_tokens == {"pacs": A, "viewer": B}
    assert settings.api_max_upload_bytes == 1000 and settings.api_tls_proxy
    assert _load(tmp_path, toml, MEDARCHIVE_API_TOKEN=f"ci={B}").api_tokens == {"ci": B}
    assert not _load(tmp_path, toml, MEDARCHIVE_API_TLS_PROXY="off").api_tls_proxy


def test_a_token_can_come_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(f"web={A}\n")
    assert _load(tmp_path, MEDARCHIVE_API_TOKEN_FILE=str(secret)).api_tokens == {"web": A}
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        _load(tmp_path, MEDARCHIVE_API_TOKEN_FILE=str(tmp_path / "missing"))
    assert "MEDARCHIVE_API_TOKEN_FILE" in known_environment() and "MEDARCHIVE_API_TOKEN" in known_environment()


@pytest.mark.parametrize("env_value, file_value", [("short", None), (f"={A}", None), (None, {"x": "short"}),
                                                   (None, {"x": 123}), (None, ["not", "a", "table"])])
def test_short_unnamed_or_malformed_tokens_are_refused(env_value: str | None, file_value: object) -> None:
    with pytest.raises(ConfigError):
        parse_api_tokens(env_value, file_value)


def test_tokens_never_show_in_the_settings_repr(tmp_path: Path) -> None:
    assert A not in repr(_load(tmp_path, MEDARCHIVE_API_TOKEN=A))


def test_the_upload_limit_defaults_to_2_gib_and_the_proxy_switch_is_checked(tmp_path: Path) -> None:
    assert _load(tmp_path).api_max_upload_bytes == 2 * 1024**3
    assert _load(tmp_path, MEDARCHIVE_API_MAX_UPLOAD_BYTES="5000").api_max_upload_bytes == 5000
    with pytest.raises(ConfigError, match="on or off"):
        _load(tmp_path, MEDARCHIVE_API_TLS_PROXY="maybe")
