"""DICOM TLS (PS3.15 B.1): with a certificate configured the SCP speaks TLS only, and checks callers' certificates.

Certificates are made by the openssl command for this test (a CA, the server's,
a client's); the peer is dcmtk's echoscu and storescu with TLS.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive.bench_serve_orthanc import free_port
from archive.dimse.server import ScpServer
from tests.integration.dimse.conftest import Scp, dcmtk, inline_dispatcher


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a server (CN localhost, IP 127.0.0.1) and a client certificate it signed (PEM)."""
    pem = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key", "client", "client-key")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=medarchive test CA",
             "-keyout", str(pem["ca-key"]), "-out", str(pem["ca"]))
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        request = folder / f"{name}.csr"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(pem[f"{name}-key"]),
                 "-out", str(request))
        extensions = folder / f"{name}.ext"
        extensions.write_text(extra + "\n")
        _openssl("x509", "-req", "-in", str(request), "-CA", str(pem["ca"]), "-CAkey", str(pem["ca-key"]),
                 "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(pem[name]))
    return pem


@pytest.fixture
def tls_port(scp: Scp, tmp_path: Path) -> Iterator[tuple[int, dict[str, Path]]]:
    pem = make_certificates(tmp_path)
    settings = dataclasses.replace(scp.archive.settings, home=tmp_path / "tls-home", scp_port=free_port(),
                                   stable_age=3600.0, scp_tls_cert=str(pem["server"]),
                                   scp_tls_key=str(pem["server-key"]), scp_tls_ca=str(pem["ca"]))
    server = ScpServer(scp.archive, inline_dispatcher(scp.archive), settings=settings)
    server.start()
    yield server.port, pem
    server.stop()


def test_tls_with_client_certificates(scp: Scp, tls_port: tuple[int, dict[str, Path]]) -> None:
    port, pem = tls_port
    address = ["-aec", scp.aet, "127.0.0.1", str(port)]
    dcmtk("echoscu", "-aet", "SECURE", "+tls", str(pem["client-key"]), str(pem["client"]), "+cf", str(pem["ca"]),
          *address)
    stored = dcmtk("storescu", "-v", "-aet", "SECURE", "+tls", str(pem["client-key"]), str(pem["client"]),
                   "+cf", str(pem["ca"]), *address, str(scp.sources("mr")[0]))
    assert "Received Store Response (Success)" in stored.stdout + stored.stderr
    plain = dcmtk("echoscu", "-aet", "PLAIN", *address, check=False, timeout=30)
    assert plain.returncode != 0  # no TLS: no association
    anonymous = dcmtk("echoscu", "-aet", "NOCERT", "+tla", "+cf", str(pem["ca"]), *address, check=False, timeout=30)
    assert anonymous.returncode != 0  # TLS without a client certificate the CA signed: refused
