"""The batch service end to end: real watcher, Celery worker and beat processes on real brokers.

Two deployments: Redis + PostgreSQL (production) and the embedded default
(kombu's SQLAlchemy transport on SQLite + SQLite catalog). Faults are real:
SIGKILLed workers, a restarted redis-server, files written while watched, an
instance that kills its worker (``MEDARCHIVE_FAULT_KILL``, see
``archive.services.jobs.fault_point``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from archive.bench_serve_orthanc import free_port
from archive.catalog.models import Encoding, Instance, ItemStatus, Job, JobItem, QuarantineEntry, Series, Study
from archive.kinds import Lane
from archive.services.jobs import submit_paths
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.conftest import _reset_postgres, shared_data
from tests.dicom_compare import stored_values
from tests.integration.service import PrivateRedis, Service

pytestmark = [pytest.mark.service]

REDIS_TEST_DB = "redis://127.0.0.1:6379/7"
MR_GE = "mr-ge-signa"  # one study, two series (21 + 50 instances)


def _service(tmp_path: Path, database_url: str, broker_url: str, **extra: str) -> Service:
    home = tmp_path / "home"
    queue = f"medarchive-test-{uuid.uuid4().hex[:12]}"
    config = tmp_path / "medarchive.toml"
    config.write_text(
        '[policies.ct-to-jpegxl]\ncodec = { id = "jpegxl", effort = 7 }\nmodalities = ["CT"]\n'
        'from_codecs = ["jpegls"]\nbatch_size = 1000\n'
    )
    env = {
        "MEDARCHIVE_HOME": str(home),
        "MEDARCHIVE_DATABASE_URL": database_url,
        "MEDARCHIVE_CONFIG": str(config),
        "MEDARCHIVE_STABLE_AGE": "2",
        "MEDARCHIVE_FILE_SETTLE": "0.5",
        "MEDARCHIVE_RESCAN_INTERVAL": "2",
        "MEDARCHIVE_CHUNK_SIZE": "8",
        "MEDARCHIVE_REQUEUE_AFTER": "6",
        "MEDARCHIVE_VISIBILITY_TIMEOUT": "20",
        "MEDARCHIVE_RECONCILE_INTERVAL": "2",
        "MEDARCHIVE_INSTANCE_TIME_LIMIT": "60",
        "MEDARCHIVE_QUEUE": queue,  # concurrent test runs share Redis
        "MEDARCHIVE_LEARNED_QUEUE": f"{queue}-learned",
        **extra,
    }
    if broker_url:
        env["MEDARCHIVE_BROKER_URL"] = broker_url
    service = Service(home=home, env=env)
    Archive.open(service.settings, migrate=True).close()  # the catalog exists before any worker starts
    return service


@pytest.fixture(params=["embedded", "redis"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    if request.param == "embedded":
        built = _service(tmp_path, f"sqlite:///{tmp_path / 'home' / 'catalog.sqlite'}", "")
    else:
        url = request.getfixturevalue("postgres_url")
        _reset_postgres(url)
        built = _service(tmp_path, url, REDIS_TEST_DB)
    yield built
    built.stop_all()


def _copy(source: Path, target: Path) -> list[Path]:
    """Drop files into an inbox the way a PACS export does: written in place, one after another."""
    copied = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        copied.append(destination)
    return copied


def _originals(folder: Path) -> dict[str, np.ndarray]:
    values = {}
    for path in folder.rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path)
            values[str(ds.SOPInstanceUID)] = stored_values(ds)
    return values


def _assert_retrieved_exactly(service: Service, study_uid: str, originals: dict[str, np.ndarray], out: Path) -> None:
    with service.archive() as archive:
        report = retrieve_study(archive, study_uid, out)
    retrieved = {str(pydicom.dcmread(f.path).SOPInstanceUID): f.path for f in report.files}
    assert set(retrieved) == set(originals)
    for uid, values in originals.items():
        assert np.array_equal(stored_values(pydicom.dcmread(retrieved[uid])), values), uid


def test_study_dropped_into_inbox_is_archived_and_retrievable(service: Service, tmp_path: Path) -> None:
    source = shared_data() / MR_GE
    originals = _originals(source)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service.start_worker(concurrency=2)
    service.start("watcher", "watch", str(inbox))
    _copy(source, inbox / "export")
    (inbox / ".DS_Store").write_bytes(b"finder junk")
    (inbox / "export" / "half.dcm.part").write_bytes(b"still uploading")

    jobs = service.wait_for(lambda: service.jobs_finished(1), 120, "the study job to finish")
    assert [j.status.value for j in jobs] == ["done"]
    assert jobs[0].counts["stored"] == len(originals) == 71
    with service.archive() as archive, archive.unit_of_work() as uow:
        study = uow.session.scalars(select(Study)).one()
        assert (study.num_series, study.num_instances) == (2, 71)
        study_uid = study.study_uid
        assert len(uow.session.scalars(select(JobItem).where(JobItem.job_id == jobs[0].id)).all()) == 71
    assert service.instance_counts() == {uid: 1 for uid in originals}
    _assert_retrieved_exactly(service, study_uid, originals, tmp_path / "out")
    # the watcher moved the study out of the inbox; hidden and partial files stay; the spool is released
    remaining = sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file())
    assert remaining == [".DS_Store", "export/half.dcm.part"]
    assert not any(service.settings.spool_dir.rglob("*.MRDC.*"))


def test_worker_sigkilled_mid_study_loses_and_duplicates_nothing(service: Service, tmp_path: Path) -> None:
    source = tmp_path / "source"
    _copy(shared_data() / MR_GE, source)
    originals = _originals(source)
    service.start_worker(concurrency=1, MEDARCHIVE_FAULT_DELAY="0.15")
    with service.archive() as archive:
        [job_id], _ = submit_paths(archive, [source], service.dispatcher())
    service.wait_for(lambda: service.items_final() >= 8 and service.items_running(), 90,
                     "a chunk archived and the next one in flight")
    service.kill("worker")  # SIGKILL the main process and its pool, mid-chunk
    done_at_kill = service.items_final()
    assert done_at_kill < 71, "the study finished before the kill; slow the worker down"
    service.start_worker(name="worker-2", concurrency=2)
    jobs = service.wait_for(lambda: service.jobs_finished(1), 150, "the study to complete after the restart")
    assert jobs[0].status.value == "done" and jobs[0].counts["stored"] == 71
    assert service.instance_counts() == {uid: 1 for uid in originals}
    with service.archive() as archive, archive.unit_of_work() as uow:
        study_uid = uow.session.scalars(select(Study.study_uid)).one()
        assert not uow.session.scalars(select(QuarantineEntry)).all()
        attempts = [i.attempts for i in uow.session.scalars(select(JobItem).where(JobItem.job_id == job_id))]
        assert max(attempts) >= 2  # the chunk in flight was redone, instance by instance
    _assert_retrieved_exactly(service, study_uid, originals, tmp_path / "out")
    assert len([p for p in source.rglob("*") if p.is_file()]) == 71  # sources handed to ingest are left in place


def test_redis_restarted_mid_study(tmp_path: Path, postgres_url: str) -> None:
    redis_server = PrivateRedis(6391, tmp_path)
    redis_server.start()
    _reset_postgres(postgres_url)
    service = _service(tmp_path, postgres_url, redis_server.url)
    source = tmp_path / "source"
    _copy(shared_data() / MR_GE, source)
    originals = _originals(source)
    try:
        service.start_worker(concurrency=1, MEDARCHIVE_FAULT_DELAY="0.1")
        service.start("beat", "beat")
        with service.archive() as archive:
            submit_paths(archive, [source], service.dispatcher())
        service.wait_for(lambda: service.items_final() >= 5, 90, "the first instances archived")
        redis_server.stop()  # every queued message is gone: the server keeps nothing on disk
        time.sleep(1)
        redis_server.start()
        jobs = service.wait_for(lambda: service.jobs_finished(1), 180, "the reconciler to re-send the lost tasks")
        assert jobs[0].status.value == "done" and jobs[0].counts["stored"] == 71
        assert service.instance_counts() == {uid: 1 for uid in originals}
    finally:
        service.stop_all()
        redis_server.stop()


def test_study_arriving_in_two_bursts(service: Service, tmp_path: Path) -> None:
    source = shared_data() / MR_GE
    localizer, fmri = sorted(p for p in source.iterdir() if p.is_dir())
    fmri_files = sorted(fmri.iterdir())
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service.env["MEDARCHIVE_STABLE_AGE"] = "3"
    service.start_worker(concurrency=2)
    service.start("watcher", "watch", str(inbox))
    # burst 1 and 2 within the stable age: one job
    _copy(localizer, inbox / "a")
    time.sleep(1.5)
    for path in fmri_files[:25]:
        shutil.copyfile(path, inbox / path.name)
    jobs = service.wait_for(lambda: service.jobs_finished(1), 90, "the first job")
    assert len(jobs) == 1 and jobs[0].counts["stored"] == 21 + 25
    # later instances of the archived study: a new job that adds to it
    for path in fmri_files[25:]:
        shutil.copyfile(path, inbox / path.name)
    jobs = service.wait_for(lambda: service.jobs_finished(2), 90, "the second job")
    assert [j.counts["stored"] for j in jobs] == [46, 25]
    assert jobs[0].study_uid == jobs[1].study_uid
    with service.archive() as archive, archive.unit_of_work() as uow:
        study = uow.session.scalars(select(Study)).one()
        assert (study.num_series, study.num_instances) == (2, 71)


def test_file_still_being_written_is_not_taken_early(service: Service, tmp_path: Path) -> None:
    path = shared_data() / MR_GE / "01_3_Plane_Localizer_FF" / "i18246598.MRDC.1"
    data = path.read_bytes()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service.start_worker(concurrency=1)
    service.start("watcher", "watch", str(inbox), "--poll")  # as on a network share: no inotify events
    target = inbox / "slow.dcm"
    with target.open("wb") as handle:  # a slow network copy: a quarter every 0.3 s (settle is 0.5 s)
        for start in range(0, len(data), len(data) // 4 + 1):
            handle.write(data[start:start + len(data) // 4 + 1])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(0.3)
    jobs = service.wait_for(lambda: service.jobs_finished(1), 60, "the file's job")
    assert jobs[0].counts == {"stored": 1, "items": 1}
    with service.archive() as archive, archive.unit_of_work() as uow:
        assert not uow.session.scalars(select(QuarantineEntry)).all()
        instance = uow.session.scalars(select(Instance)).one()
        assert instance.source_size == len(data)


def test_poison_instance_is_quarantined_alone(service: Service, tmp_path: Path) -> None:
    fmri = shared_data() / MR_GE / "02_Ax_fMRI_FF_I11.1_S15.9"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = sorted(fmri.iterdir())[:12]
    poison = files[5].name
    truncated = shared_data() / "broken" / "truncated-pixel-data.dcm"
    # a worker that SIGKILLs itself on the poison instance, every time (MEDARCHIVE_FAULT_KILL)
    service.start_worker(concurrency=1, MEDARCHIVE_FAULT_KILL=poison)
    service.start("watcher", "watch", str(inbox))
    for path in files:
        shutil.copyfile(path, inbox / path.name)
    shutil.copyfile(truncated, inbox / "truncated.dcm")  # bad input: quarantined at once, never retried
    jobs = service.wait_for(lambda: service.jobs_finished(2), 150, "the series to complete without the poison")
    with service.archive() as archive, archive.unit_of_work() as uow:
        items = {Path(i.path or "").name: i for i in uow.session.scalars(select(JobItem))}
        assert items[poison].status is ItemStatus.QUARANTINED
        assert "worker died" in (items[poison].error or "")
        assert items["truncated.dcm"].status is ItemStatus.QUARANTINED and items["truncated.dcm"].attempts == 1
        others = [i for name, i in items.items() if name not in (poison, "truncated.dcm")]
        assert len(others) == 11 and all(i.status is ItemStatus.DONE and i.outcome == "stored" for i in others)
        reasons = {Path(q.source_path).name: q for q in uow.session.scalars(select(QuarantineEntry))}
        assert set(reasons) == {poison, "truncated.dcm"}
        assert Path(reasons[poison].stored_path).read_bytes() == (fmri / poison).read_bytes()
    assert all(j.status.value == "done" for j in jobs)
    assert not any(p.is_file() for p in service.settings.spool_dir.rglob("*"))


def test_recompression_sweep_interrupted_and_resumed(service: Service, tmp_path: Path) -> None:
    source = tmp_path / "ct"
    source.mkdir()
    for path in sorted(p for p in (shared_data() / "ct-chest-tcia").rglob("*") if p.is_file())[:12]:
        shutil.copyfile(path, source / f"{path.parent.parent.name}-{path.parent.name}-{path.name}")
    originals = _originals(source)
    service.start_worker(concurrency=1)
    with service.archive() as archive:
        submit_paths(archive, [source], service.dispatcher())
    service.wait_for(lambda: service.jobs_finished(len({_study(p) for p in source.iterdir()})), 120, "ingest")
    service.kill("worker")
    original_encodings = (select(Encoding).join(Instance, Instance.id == Encoding.instance_id).join(Series)
                          .where(Series.derived_from_id.is_(None)))
    with service.archive() as archive, archive.unit_of_work() as uow:
        before = {e.instance_id: e.id for e in uow.session.scalars(original_encodings.where(Encoding.is_current))}
        assert {e.codec_id for e in uow.session.scalars(select(Encoding))} == {"jpegls"}
        ingest_jobs = len(uow.session.scalars(select(Job)).all())
        # the workers normalized the axial CT in the ingest jobs (shipped CT profile); the coarse reformats stay as
        # acquired; re-compression policies leave normalized copies to their profile's codec
        normalized = uow.session.scalars(select(Series).where(Series.derived_from_id.is_not(None))).all()
        assert normalized and all(j.counts.get("normalized_series") for j in uow.session.scalars(select(Job))
                                  if j.study_uid in {s.study.study_uid for s in normalized})

    service.start_worker(name="worker-2", concurrency=1, MEDARCHIVE_FAULT_DELAY="0.3")
    from workers.app import create_app

    create_app(service.settings).send_task("medarchive.recompress_sweep", args=("ct-to-jpegxl",))
    service.wait_for(lambda: service.items_final() >= len(before) + 3, 120, "a few instances re-compressed")
    service.kill("worker-2")
    with service.archive() as archive, archive.unit_of_work() as uow:
        partial = sum(1 for e in uow.session.scalars(select(Encoding).where(Encoding.is_current))
                      if e.codec_id == "jpegxl")
    assert 0 < partial < len(before)
    service.start_worker(name="worker-3", concurrency=1)
    service.start("beat", "beat")  # the reconciler resumes the sweep's job
    jobs = service.wait_for(lambda: service.jobs_finished(ingest_jobs + 1), 180, "the sweep to finish")
    sweep = jobs[-1]
    assert sweep.kind == "recompress" and sweep.status.value == "done"
    with service.archive() as archive, archive.unit_of_work() as uow:
        current = list(uow.session.scalars(original_encodings.where(Encoding.is_current)))
        assert len(current) == len(before)  # one current encoding per instance
        assert all(e.codec_id == "jpegxl" and e.generation == 2 for e in current)
        assert all(e.derived_from_id == before[e.instance_id] for e in current)
        old = [uow.session.get_one(Encoding, i) for i in before.values()]
        assert all(o.released_at is not None and not o.frames for o in old)
        studies = list(uow.session.scalars(select(Study.study_uid)))
    from archive.services.integrity import collect_garbage, verify_blobs

    with service.archive() as archive:
        assert collect_garbage(archive, grace_seconds=0).blob_rows >= len(before)
        assert not verify_blobs(archive).problems
    out = tmp_path / "out"
    for study_uid in studies:
        with service.archive() as archive:
            retrieve_study(archive, study_uid, out / study_uid[-12:])
    retrieved = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.rglob("*.dcm")}
    assert set(retrieved) == set(originals)
    for uid, values in originals.items():
        assert np.array_equal(stored_values(pydicom.dcmread(retrieved[uid])), values)


def test_learned_codec_work_waits_for_a_worker_on_the_learned_lane(tmp_path: Path, postgres_url: str) -> None:
    """The archive's codec is the learned one: its ingest tasks go to the learned queue, which only a worker
    started with ``--lane learned`` takes; what it stores retrieves bit-exactly."""
    import redis

    _reset_postgres(postgres_url)
    service = _service(tmp_path, postgres_url, REDIS_TEST_DB, MEDARCHIVE_CODEC="learned", MEDARCHIVE_NORMALIZE="off")
    try:
        source = tmp_path / "mr"
        source.mkdir()
        for path in sorted((shared_data() / "mr-siemens-prisma").rglob("*.dcm"))[:3]:
            shutil.copyfile(path, source / path.name)
        originals = _originals(source)
        service.start_worker(lane=Lane.DEFAULT)
        with service.archive() as archive:
            submit_paths(archive, [source], service.dispatcher())
        learned_queue = service.settings.learned_queue
        broker = redis.Redis.from_url(REDIS_TEST_DB)
        assert broker.llen(learned_queue) == 1 and broker.llen(service.settings.queue) == 0
        time.sleep(3)  # the default-lane worker is up and idle: the task waits for its lane
        assert broker.llen(learned_queue) == 1 and service.jobs_finished(1) is None
        service.start_worker(name="learned", lane=Lane.LEARNED)
        service.wait_for(lambda: service.jobs_finished(1), 120, "the learned lane's worker to ingest")
        with service.archive() as archive, archive.unit_of_work() as uow:
            encodings = list(uow.session.scalars(select(Encoding).where(Encoding.is_current)))
            assert len(encodings) == 3 and {e.codec_id for e in encodings} == {"learned"}
            assert all(e.encode_ms > 0 and e.decode_ms > 0 for e in encodings)
            study_uid = uow.session.scalars(select(Study.study_uid)).one()
        _assert_retrieved_exactly(service, study_uid, originals, tmp_path / "out")
    finally:
        service.stop_all()


def _study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_run_starts_every_role_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = str(free_port())
    service = _service(tmp_path, f"sqlite:///{tmp_path / 'home' / 'catalog.sqlite'}", "",
                       MEDARCHIVE_SCP_ENABLED="on", MEDARCHIVE_SCP_PORT=port)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = shared_data() / MR_GE / "01_3_Plane_Localizer_FF"
    run = service.start("run", "run", str(inbox), "--concurrency", "1")
    try:
        _copy(source, inbox)
        jobs = service.wait_for(lambda: service.jobs_finished(1), 120, "the study via `medarchive run`")
        assert jobs[0].status.value == "done" and jobs[0].counts["stored"] == 21
        sent = sorted((shared_data() / "mr-siemens-prisma").rglob("*.dcm"))[:3]  # and one over DICOM (scp_enabled)
        subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "MEDARCHIVE", "127.0.0.1", port, *map(str, sent)],
                       check=True, capture_output=True, timeout=60)
        jobs = service.wait_for(lambda: service.jobs_finished(2), 120, "the study sent to the SCP of `run`")
        assert jobs[1].status.value == "done" and jobs[1].counts["stored"] == 3
        children = _children(run.pid)
        assert len(children) >= 4  # watcher, worker, beat, scp
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert run.wait(timeout=90) == 0
        assert not [pid for pid in children if _alive(pid)]
    finally:
        service.stop_all()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
