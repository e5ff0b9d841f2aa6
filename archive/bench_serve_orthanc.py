"""The servers ``medarchive bench serve`` starts: a server subprocess on a free loopback port, and Orthanc.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) runs privately:
its own JSON configuration, storage and index in a temporary folder, HTTP on a
free loopback port, no DICOM listener (``medarchive bench scp`` opens one), HTTP compression off (both servers must
send the same bytes the client times). It is loaded with the same files
medarchive ingested, each transcoded to JPEG-LS Lossless first
(``Dataset.compress``, pyjpegls), so both archives hold JPEG-LS and both must
decode it to answer a request for Explicit VR Little Endian.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import httpx
import pydicom
from pydicom.uid import JPEGLSLossless

from archive.dicom.reader import NATIVE_SYNTAXES
from archive.errors import ArchiveError

ORTHANC_BINARY: Final[Path] = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN: Final[Path] = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET: Final[str] = "ORTHANC"
#: Uncompressed syntaxes a lossless JPEG-LS copy is made from; anything else is uploaded as received.


def free_port() -> int:
    """A TCP port nothing listens on at this moment (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """A server as a child process, ready once ``ready_url`` answers; stopped (TERM, then KILL) on exit.

    Its output goes to ``log`` (a file, never a pipe nobody reads, which would
    block the server once full); the tail is quoted when it fails to start.
    """

    def __init__(self, name: str, command: Sequence[str], *, env: Mapping[str, str], log: Path, ready_url: str = "",
                 cwd: Path | None = None, start_timeout: float = 60.0, ready: Callable[[], bool] | None = None,
                 new_session: bool = False) -> None:
        """``ready`` (when given) replaces the HTTP probe of ``ready_url``; ``new_session`` puts the child in its
        own process group, stopped as a whole (a Celery worker and its pool)."""
        self.name, self.command, self.env, self.log = name, list(command), dict(env), log
        self.ready_url, self.cwd, self.start_timeout = ready_url, cwd, start_timeout
        self.ready, self.new_session = ready, new_session
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> None:
        """Start the child without waiting (several servers can then start at once)."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=self.new_session)

    def wait_ready(self) -> None:
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise ArchiveError(f"{self.name} exited with status {self.process.returncode} while starting: "
                                       f"{self.log_tail()}")
                if self._answers(client):
                    return
                if time.monotonic() > deadline:
                    self.stop()
                    raise ArchiveError(f"{self.name} did not answer at {self.ready_url or 'its readiness check'} "
                                       f"within {self.start_timeout:.0f} s: {self.log_tail()}")
                time.sleep(0.1)

    def _answers(self, client: httpx.Client) -> bool:
        if self.ready is not None:
            return self.ready()
        try:
            client.get(self.ready_url)  # any answer, 401 or 404 included: it listens
            return True
        except httpx.TransportError:
            return False

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def stop(self, grace: float = 15.0) -> None:
        """TERM, then KILL after ``grace`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(5)

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            if self.new_session:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


def orthanc_missing() -> str | None:
    """Why Orthanc cannot be measured here, or None when it and its DICOMweb plugin are installed."""
    missing = [str(p) for p in (ORTHANC_BINARY, DICOMWEB_PLUGIN) if not p.exists()]
    if missing:
        return (f"Orthanc is not installed ({', '.join(missing)} missing; Debian packages orthanc and "
                "orthanc-dicomweb): medarchive is measured alone")
    return None


def orthanc_version() -> str:
    try:
        done = subprocess.run([str(ORTHANC_BINARY), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split()[-1] if first else "unknown"


def orthanc_config(folder: Path, http_port: int, dicom_port: int | None = None) -> dict[str, object]:
    """A private Orthanc: storage in ``folder``, loopback HTTP only, DICOMweb on ``/dicom-web/``; with
    ``dicom_port``, also a DICOM listener (AE ``ORTHANC``) that stores and serves C-GET for any caller."""
    dicom: dict[str, object] = {"DicomServerEnabled": False, "DicomPort": free_port()}  # read even when disabled
    if dicom_port is not None:
        dicom = {"DicomServerEnabled": True, "DicomPort": dicom_port, "DicomAet": ORTHANC_AET,
                 "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
                 "DicomAlwaysAllowGet": True, "DicomModalities": {}}
    return {
        "Name": "medarchive-bench",
        "HttpPort": http_port,
        **dicom,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpCompressionEnabled": False,  # gzip would change what the client receives and times
        "KeepAlive": True,
        "TcpNoDelay": True,
        "StableAge": 60,
    }


class Orthanc(ServerProcess):
    """Orthanc with the DICOMweb plugin in ``folder``; ``url`` is its REST root, ``dicomweb`` the DICOMweb root."""

    def __init__(self, folder: Path, dicom_port: int | None = None, extra_env: Mapping[str, str] | None = None
                 ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = folder / "orthanc.json"
        config.write_text(json.dumps(orthanc_config(folder, port, dicom_port), indent=2))
        self.url = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.dicom_port = dicom_port
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        env.update(extra_env or {})
        super().__init__("Orthanc", [str(ORTHANC_BINARY), str(config)], env=env, log=folder / "orthanc.log",
                         ready_url=f"{self.url}/system", cwd=folder)

    def __enter__(self) -> Orthanc:
        super().__enter__()
        return self


@dataclass(frozen=True)
class OrthancLoad:
    """What was uploaded: instances Orthanc accepted, how many were transcoded to JPEG-LS, and the time it took."""

    files: int
    instances: int
    transcoded: int
    as_received: int
    not_dicom: int
    bytes_uploaded: int
    seconds: float


def jpegls_lossless(path: Path) -> tuple[bytes, bool] | None:
    """The file as a Part 10 JPEG-LS Lossless file (and True), as received where it is not native (False); None:
    not DICOM."""
    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
        return None
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if "PixelData" not in ds or syntax not in NATIVE_SYNTAXES:
        return path.read_bytes(), False
    try:
        ds.compress(JPEGLSLossless, generate_instance_uid=False)  # same UIDs as medarchive holds
    except Exception:  # noqa: BLE001  (a format the encoder refuses is uploaded as received, and counted)
        return path.read_bytes(), False
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), True


def load_orthanc(orthanc: Orthanc, files: Sequence[Path], progress: Callable[[str], None] | None = None
                 ) -> OrthancLoad:
    """``POST /instances`` every file, JPEG-LS Lossless where it was native; an upload Orthanc refuses is an error."""
    say = progress or (lambda _message: None)
    instances = transcoded = as_received = not_dicom = uploaded = 0
    started = time.perf_counter()
    with httpx.Client(base_url=orthanc.url, timeout=60.0) as client:
        for index, path in enumerate(files):
            if index % 25 == 0:
                say(f"Orthanc: uploading {index + 1}/{len(files)} (JPEG-LS Lossless)")
            made = jpegls_lossless(path)
            if made is None:
                not_dicom += 1
                continue
            data, was_transcoded = made
            answer = client.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
            if answer.status_code != 200:
                raise ArchiveError(f"Orthanc refused {path.name}: HTTP {answer.status_code} {answer.text[:200]}")
            instances += 1
            uploaded += len(data)
            transcoded += was_transcoded
            as_received += not was_transcoded
    return OrthancLoad(len(files), instances, transcoded, as_received, not_dicom, uploaded,
                       time.perf_counter() - started)
