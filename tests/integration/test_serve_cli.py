"""``medarchive serve`` as a real process: its refusals, HTTPS with a self-signed certificate, and ``audit``."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

import archive.cli.serve  # noqa: F401  (registers serve and audit)
from archive.bench_serve_orthanc import free_port
from archive.cli import app, describe_failure
from archive.errors import ConfigError
from tests.conftest import REPO

TOKEN = "cli-token-0123456789abcdef"
# the command as installed (`medarchive ...`); importing the module registers it even before the
# package's command list names it
COMMAND = [sys.executable, "-c", "import archive.cli.serve; from archive.cli import main; main()"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    return {**env, "MEDARCHIVE_HOME": str(home), "MEDARCHIVE_NORMALIZE": "off", **extra}


def _invoke(home: Path, *args: str, **extra: str) -> Result:
    """The command in this process (the refusals come before anything is opened or served)."""
    env = {k: None for k in os.environ if k.startswith("MEDARCHIVE_")}
    return CliRunner().invoke(app, list(args), env={**env, "MEDARCHIVE_HOME": str(home), "COLUMNS": "120", **extra})


@pytest.mark.parametrize("args, env, says", [
    (["--host", "0.0.0.0"], {}, "without an API token"),
    (["--host", "10.1.2.3", "--port", "1"], {"MEDARCHIVE_API_TOKEN": TOKEN}, "--tls-cert"),
    (["--host", "example.org"], {"MEDARCHIVE_API_TOKEN": TOKEN}, "--tls-cert"),
    (["--tls-cert", "/nonexistent/c.pem"], {}, "go together"),
    (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], {}, "no such file"),
])
def test_it_refuses_to_expose_the_archive_without_a_token_or_without_tls(tmp_path: Path, args: list[str],
                                                                          env: dict[str, str], says: str) -> None:
    result = _invoke(tmp_path / "home", "serve", *args, **env)
    assert isinstance(result.exception, ConfigError), result.output
    message, code = describe_failure(result.exception)
    assert code == 2 and says in message and TOKEN not in message
    assert not (tmp_path / "home").exists()  # refused before anything was opened


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def https_server(tmp_path: Path, certificate: tuple[Path, Path]) -> Iterator[tuple[str, ssl.SSLContext, Path]]:
    cert, key = certificate
    home = tmp_path / "home"
    port = free_port()
    process = subprocess.Popen([*COMMAND, "serve", "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)],
                               env=_env(home, MEDARCHIVE_API_TOKEN=f"cli={TOKEN}"), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", verify=context, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.terminate()
                raise AssertionError(f"medarchive serve did not start: {process.communicate(timeout=30)[0]}")
            time.sleep(0.1)
        yield url, context, home
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
        assert TOKEN not in output  # the URL is printed, never the token
        assert f"https://127.0.0.1:{port}/" in output


def test_it_serves_https_and_the_audit_lists_what_clients_did(https_server: tuple[str, ssl.SSLContext, Path]) -> None:
    url, context, home = https_server
    with httpx.Client(base_url=url, verify=context, timeout=30) as client:
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        signed_in = client.post("/session", data={"token": TOKEN}, follow_redirects=False)
        assert signed_in.status_code == 303 and "secure" in signed_in.headers["set-cookie"].lower()  # over TLS
    audit = _invoke(home, "audit", "--json")
    assert audit.exit_code == 0, audit.output
    rows = json.loads(audit.stdout)
    assert [(r["token_name"], r["action"], r["status"]) for r in rows] == [("cli", "sign-in", 303)]
    table = _invoke(home, "audit", "--action", "sign-in", "--token", "cli")
    assert table.exit_code == 0 and "sign-in" in table.stdout and "cli" in table.stdout
    assert "sign-in" not in _invoke(home, "audit", "--token", "nobody").stdout.split("Access log")[1]
