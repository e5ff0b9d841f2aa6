"""``medarchive scp`` as a process with a real Celery worker: what modalities send is archived by the workers.

PostgreSQL and Redis, as in production. A study arrives over two associations
in interleaved order; the SCP's own watcher queues it once, when it is stable,
and the worker archives it. The access log then shows each association.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive.bench_serve_orthanc import free_port
from tests.conftest import _reset_postgres, shared_data
from tests.integration.dimse.conftest import dcmtk
from tests.integration.service import REPO, Service
from tests.integration.test_service import REDIS_TEST_DB, _service

SERIES = shared_data() / "mr-ge-signa" / "01_3_Plane_Localizer_FF"  # 21 instances of one study


@pytest.fixture
def scp_service(tmp_path: Path, postgres_url: str) -> Iterator[Service]:
    _reset_postgres(postgres_url)
    service = _service(tmp_path, postgres_url, REDIS_TEST_DB, MEDARCHIVE_SCP_PORT=str(free_port()),
                       MEDARCHIVE_NORMALIZE="off")
    yield service
    service.stop_all()


@pytest.mark.postgres
def test_scp_process_queues_a_study_sent_over_two_associations_to_the_workers(scp_service: Service) -> None:
    port = scp_service.env["MEDARCHIVE_SCP_PORT"]
    scp_service.start("scp", "scp", "--host", "127.0.0.1")
    scp_service.start_worker()
    scp_service.wait_for(lambda: dcmtk("echoscu", "-aet", "CT1", "-aec", "MEDARCHIVE", "127.0.0.1", port,
                                       check=False).returncode == 0, 60, "the SCP to answer C-ECHO")
    files = sorted(p for p in SERIES.iterdir() if p.is_file())
    first, second = files[1::2], files[0::2][::-1]  # interleaved, the second half in reverse order
    senders = [subprocess.Popen(["storescu", "-aet", "CT1", "-aec", "MEDARCHIVE", "127.0.0.1", port,
                                 *map(str, half)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for half in (first, second)]
    for sender in senders:
        output, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, output
    jobs = scp_service.wait_for(lambda: scp_service.jobs_finished(1), 120, "the study to be archived")
    assert len(jobs) == 1 and jobs[0].status.value == "done" and jobs[0].counts["stored"] == len(files)
    assert set(scp_service.instance_counts().values()) == {1} and len(scp_service.instance_counts()) == len(files)
    audit = subprocess.run([sys.executable, "-m", "archive.cli", "audit", "--token", "dimse:CT1", "--json"],
                           cwd=REPO, env={**scp_service.env, "PATH": "/usr/bin:/bin"}, capture_output=True,
                           text=True, timeout=60)
    rows = json.loads(audit.stdout)
    stores = [r for r in rows if r["action"] == "store"]
    associations = [r for r in rows if r["action"] == "associate" and r["target"] == "released"]
    assert sum(r["instances"] for r in stores) == len(files) and len(associations) >= 2, rows
    assert all(r["client"] == "127.0.0.1" for r in rows)
