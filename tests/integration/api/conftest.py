"""One real server for the API tests: an archive with real CT and MR, served by uvicorn on a free port.

The server runs in a thread of the test process (a real HTTP server on a real
socket: clients reach it over TCP like any other); ``medarchive serve`` itself
is started as a process by its own test. The archive holds one CT patient (two
studies of three one-instance series: ../shared/data/ct-chest-tcia/A002304), eight MR
instances of one series (mr-siemens-prisma), a CT image whose Patient's Name
holds HTML, and, for the CT axial series, a lossy derivative (JPEG-LS near 2)
and the normalized series ingest makes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import uvicorn
from pydicom.data import get_testdata_file
from sqlalchemy import select

from archive.api.app import create_app
from archive.bench_serve_orthanc import free_port
from archive.catalog.models import Derivation, Instance, Series
from archive.config import RecompressPolicy, Settings
from archive.kinds import DerivationKind
from archive.services.ingest import ingest_paths
from archive.services.lossy import derive_lossy
from archive.services.runtime import Archive
from tests.conftest import copy_ct_and_mr
from tests.synthetic import with_new_uids

TOKEN = "tests-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"
HTML_NAME = "<script>alert(1)</script>^<b>Bold</b>"
NEAR2 = {"id": "jpegls", "near": 2}


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    archive: Archive
    source: Path  # the ingested copies, by folder: ct/, mr/, html/
    ct_study_uid: str
    mr_study_uid: str
    html_study_uid: str
    lossy_series_uid: str  # the lossy derivative of the CT axial series
    headers: dict[str, str] = field(default_factory=dict)  # the bearer header with TOKEN

    def sources(self, folder: str) -> list[Path]:
        return sorted(p for p in (self.source / folder).rglob("*.dcm"))


def _html_named_instance(target: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = HTML_NAME
    ds.PatientID = "HTML-1"
    with_new_uids(ds)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)


class ThreadedServer:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a daemon thread until :meth:`stop`."""

    def __init__(self, app: object, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(archive: Archive) -> tuple[str, ThreadedServer]:
    port = free_port()
    server = ThreadedServer(create_app(archive), port)
    server.start()
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    source = root / "source"
    copy_ct_and_mr(source)
    _html_named_instance(source / "html" / "html.dcm")
    settings = Settings.load(environ={}, home=root / "home", normalize=True,
                             api_tokens={"tests": TOKEN, "other": OTHER_TOKEN})
    archive = Archive.open(settings, migrate=True)
    report = ingest_paths(archive, [source])
    assert report.instances == 6 + 8 + 1, report.outcomes
    uids = {folder: pydicom.dcmread(sorted((source / folder).rglob("*.dcm"))[0], stop_before_pixels=True)
            .StudyInstanceUID for folder in ("ct", "mr", "html")}
    axial = pydicom.dcmread(sorted((source / "ct" / "axial").rglob("*.dcm"))[0], stop_before_pixels=True)
    uids["ct"] = axial.StudyInstanceUID  # the CT patient has two studies: this one holds the lossy derivative
    with archive.unit_of_work() as uow:
        instance_id = uow.session.scalar(select(Instance.id).where(Instance.sop_instance_uid == axial.SOPInstanceUID))
    assert instance_id is not None
    derive_lossy(archive, instance_id, RecompressPolicy(name="near2", codec=NEAR2))
    with archive.unit_of_work() as uow:
        lossy_series = uow.session.scalar(
            select(Series.series_uid).join(Instance).join(Derivation, Derivation.series_id == Series.id)
            .where(Instance.derived_from_id == instance_id, Derivation.kind == DerivationKind.LOSSY))
    assert lossy_series is not None
    url, server = serve(archive)
    try:
        yield Served(url=url, archive=archive, source=source, ct_study_uid=uids["ct"], mr_study_uid=uids["mr"],
                     html_study_uid=uids["html"], lossy_series_uid=lossy_series,
                     headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        server.stop()
        archive.close()
