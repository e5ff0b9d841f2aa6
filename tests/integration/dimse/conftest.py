"""One real SCP for the DIMSE tests: an archive with real CT and MR, served by pynetdicom on a free port.

The SCP (:class:`archive.dimse.server.ScpServer`) runs in threads of the test
process — a real DICOM server on a real socket, which dcmtk's tools and
pynetdicom reach over TCP like any other peer; ``medarchive scp`` as a process,
with real Celery workers, is started by ``test_scp_service.py``. What the SCP
receives is archived by the in-process watcher with an inline dispatcher (no
broker), so a study sent here is in the catalog a moment after it is stable.

The archive holds one CT patient (two studies of three one-instance series:
../shared/data/ct-chest-tcia/A002304), eight MR instances of one series
(mr-siemens-prisma), the normalized series ingest makes, and a lossy
derivative (JPEG-LS near 2) of the CT axial series. ``destinations`` name
AE titles the tests may listen as (``MOVEDEST``, ``COMMITSCU``): the SCP
knows their ports from its configuration, as in production.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from archive.bench_serve_orthanc import free_port
from archive.catalog.models import Derivation, Instance, Series
from archive.config import RecompressPolicy, Settings
from archive.dimse.server import ScpServer
from archive.kinds import DerivationKind, Lane
from archive.services import jobs
from archive.services.ingest import ingest_paths
from archive.services.lossy import derive_lossy
from archive.services.runtime import Archive
from tests.conftest import copy_ct_and_mr

NEAR2 = {"id": "jpegls", "near": 2}
DERIVED_AE = "DERIVEDOK"  # a calling AE configured to see derived series in C-FIND


@dataclass
class Scp:
    host: str
    port: int
    aet: str
    archive: Archive
    server: ScpServer
    source: Path  # the ingested copies, by folder: ct/, mr/
    ct_study_uid: str  # the CT study that holds the lossy derivative
    mr_study_uid: str
    lossy_series_uid: str
    destinations: dict[str, int]  # AE title -> port on 127.0.0.1, as configured in scp_destinations

    def sources(self, folder: str) -> list[Path]:
        return sorted((self.source / folder).rglob("*.dcm"))

    def address(self) -> list[str]:
        """dcmtk's ``-aec AET host port`` arguments."""
        return ["-aec", self.aet, self.host, str(self.port)]


def dcmtk(tool: str, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one of dcmtk's tools (Debian package dcmtk, installed by .ci/run); its output is in the result."""
    binary = shutil.which(tool)
    assert binary, f"{tool} is not installed: apt-get install dcmtk"
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    return done


def inline_dispatcher(archive: Archive) -> jobs.Dispatcher:
    """Run a queued task at once in the caller's thread (the watcher's): no broker in these tests."""
    def dispatch(task_id: int, lane: Lane = Lane.DEFAULT) -> str:
        jobs.run_task(archive, task_id)
        return f"inline-{task_id}"
    return dispatch


@pytest.fixture(scope="session")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scp]:
    root = tmp_path_factory.mktemp("scp")
    source = root / "source"
    copy_ct_and_mr(source)
    destinations = {"MOVEDEST": free_port(), "COMMITSCU": free_port()}
    port = free_port()
    settings = Settings.load(
        environ={}, home=root / "home", normalize=True, stable_age=0.5, scp_port=port, scp_host="127.0.0.1",
        scp_derived_aes=(DERIVED_AE,), scp_commit_timeout=30.0,
        scp_destinations={ae: f"127.0.0.1:{p}" for ae, p in destinations.items()})
    archive = Archive.open(settings, migrate=True)
    report = ingest_paths(archive, [source])
    assert report.instances == 6 + 8, report.outcomes
    axial = pydicom.dcmread(sorted((source / "ct" / "axial").rglob("*.dcm"))[0], stop_before_pixels=True)
    mr = pydicom.dcmread(sorted((source / "mr").rglob("*.dcm"))[0], stop_before_pixels=True)
    with archive.unit_of_work() as uow:
        instance_id = uow.session.scalar(select(Instance.id).where(Instance.sop_instance_uid == axial.SOPInstanceUID))
    assert instance_id is not None
    derive_lossy(archive, instance_id, RecompressPolicy(name="near2", codec=NEAR2))
    with archive.unit_of_work() as uow:
        lossy_series = uow.session.scalar(
            select(Series.series_uid).join(Instance).join(Derivation, Derivation.series_id == Series.id)
            .where(Instance.derived_from_id == instance_id, Derivation.kind == DerivationKind.LOSSY))
    assert lossy_series is not None
    server = ScpServer(archive, inline_dispatcher(archive))
    server.start()
    try:
        yield Scp(host="127.0.0.1", port=server.port, aet=settings.scp_aet, archive=archive, server=server,
                  source=source, ct_study_uid=axial.StudyInstanceUID, mr_study_uid=mr.StudyInstanceUID,
                  lossy_series_uid=lossy_series, destinations=destinations)
    finally:
        server.stop()
        archive.close()
