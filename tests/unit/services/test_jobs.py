"""Jobs, claims, careful mode, poison instances, the spool and the reconciler, without a broker.

The dispatcher here runs nothing: it records which job tasks would have been
sent, so each use case is driven step by step on a real catalog (SQLite and
PostgreSQL) with real DICOM files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from archive.catalog.models import Instance, ItemStatus, Job, JobItem, JobStatus, JobTask, QuarantineEntry, Study
from archive.errors import InstanceTimeLimitExceeded
from archive.kinds import Lane
from archive.services import executors, jobs, leases, submission
from archive.services import spool as spooling
from archive.services.runtime import Archive
from tests.conftest import shared_data

MR_GE = "mr-ge-signa"


class Recorder:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def __call__(self, task_id: int, lane: Lane) -> str:
        assert lane is Lane.DEFAULT  # these jobs' codecs run no model (tests/unit/services/test_lanes.py)
        self.sent.append(task_id)
        return f"message-{task_id}-{len(self.sent)}"


@pytest.fixture
def study_files(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    for folder in sorted((shared_data() / MR_GE).iterdir()):
        for path in sorted(folder.iterdir())[:10]:
            target = source / folder.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return source  # two series, 10 instances each


def _items(archive: Archive, job_id: int) -> list[JobItem]:
    with archive.unit_of_work() as uow:
        items = list(uow.session.scalars(select(JobItem).where(JobItem.job_id == job_id).order_by(JobItem.id)))
        uow.session.expunge_all()
    return items


def _set_items(archive: Archive, task_id: int, **values: object) -> None:
    with archive.unit_of_work() as uow:
        uow.session.execute(update(JobItem).where(JobItem.task_id == task_id).values(**values))
        uow.commit()


def test_small_series_share_a_task_big_ones_are_split() -> None:
    specs = ([jobs.ItemSpec(path=f"a{i}", series_uid="A") for i in range(10)]
             + [jobs.ItemSpec(path=f"{s}0", series_uid=s) for s in "BCD"]
             + [jobs.ItemSpec(path=f"e{i}", series_uid="E") for i in range(3)])
    chunks = submission._chunks(specs, 4)
    assert [(series, len(c)) for series, c in chunks] == [("A", 4), ("A", 4), ("A", 2), (None, 3), ("E", 3)]
    assert [s.path for s in chunks[3][1]] == ["B0", "C0", "D0"]  # one-instance series share a task


def test_jobs_are_chunked_per_series(archive: Archive, study_files: Path) -> None:
    archive = Archive.open(dataclasses.replace(archive.settings, chunk_size=4))
    recorder = Recorder()
    [job_id], skipped = jobs.submit_paths(archive, [study_files], recorder)
    assert not skipped
    with archive.unit_of_work() as uow:
        tasks = list(uow.session.scalars(select(JobTask).where(JobTask.job_id == job_id)))
        sizes = sorted(len(t.items) for t in tasks)
        assert sizes == [2, 2, 4, 4, 4, 4]  # 10 = 4 + 4 + 2 per series, never mixing series
        assert all(len({pydicom.dcmread(i.path, stop_before_pixels=True).SeriesInstanceUID for i in t.items}) == 1
                   for t in tasks)
        assert all(t.dispatches == 1 and t.dispatched_at is not None for t in tasks)
        assert sorted(recorder.sent) == sorted(t.id for t in tasks)


def test_batch_run_archives_the_chunk_and_finalizes(archive: Archive, study_files: Path) -> None:
    recorder = Recorder()
    [job_id], _ = jobs.submit_paths(archive, [study_files], recorder)
    reports = [jobs.run_task(archive, task_id) for task_id in recorder.sent]
    assert all(r.mode == "batch" for r in reports)
    assert [r.finalized for r in reports] == [False] * (len(reports) - 1) + [True]
    assert {i.status for i in _items(archive, job_id)} == {ItemStatus.DONE}
    with archive.unit_of_work() as uow:
        job = uow.session.get_one(Job, job_id)
        assert job.status is JobStatus.DONE and job.counts["stored"] == 20
        study = uow.session.scalars(select(Study)).one()
        assert (study.num_series, study.num_instances) == (2, 20)
    # a redelivered message finds nothing left to do
    again = jobs.run_task(archive, recorder.sent[0])
    assert not again.outcomes and again.mode == "batch"


def test_redelivery_after_a_dead_worker_goes_instance_by_instance(archive: Archive, study_files: Path) -> None:
    recorder = Recorder()
    [job_id], _ = jobs.submit_paths(archive, [study_files], recorder)
    first = recorder.sent[0]
    dead = f"{socket.gethostname()}:{2**22 + 17}:1"  # no such pid on this host
    _set_items(archive, first, status=ItemStatus.RUNNING, owner=dead, attempts=1,
               lease_until=datetime.now(timezone.utc) + timedelta(hours=1))
    report = jobs.run_task(archive, first)
    assert report.mode == "careful" and report.outcomes["stored"] == 20  # both 10-instance series share a task
    items = [i for i in _items(archive, job_id) if i.task_id == first]
    assert all(i.status is ItemStatus.DONE and i.attempts == 2 for i in items)


def test_an_instance_that_keeps_killing_its_worker_is_quarantined_alone(archive: Archive, study_files: Path) -> None:
    recorder = Recorder()
    [job_id], _ = jobs.submit_paths(archive, [study_files], recorder)
    first = recorder.sent[0]
    dead = f"{socket.gethostname()}:{2**22 + 17}:1"
    poison = _items(archive, job_id)[3]
    with archive.unit_of_work() as uow:  # the careful retry died on this one too: attempts == max_attempts
        uow.session.execute(update(JobItem).where(JobItem.id == poison.id).values(
            status=ItemStatus.RUNNING, owner=dead, attempts=archive.settings.max_attempts))
        uow.commit()
    report = jobs.run_task(archive, first)
    items = {i.id: i for i in _items(archive, job_id) if i.task_id == first}
    assert items[poison.id].status is ItemStatus.QUARANTINED and "worker died" in (items[poison.id].error or "")
    assert sum(i.status is ItemStatus.DONE for i in items.values()) == 19
    assert report.outcomes == {"stored": 19, "quarantined": 1}
    with archive.unit_of_work() as uow:
        entry = uow.session.scalars(select(QuarantineEntry)).one()
        assert Path(entry.stored_path).read_bytes() == Path(poison.path or "").read_bytes()


def test_items_held_by_a_live_worker_are_left_alone(archive: Archive, study_files: Path) -> None:
    recorder = Recorder()
    [job_id], _ = jobs.submit_paths(archive, [study_files], recorder)
    first = recorder.sent[0]
    parent = os.getppid()
    alive = f"{socket.gethostname()}:{parent}:{leases._start_ticks(parent)}"
    _set_items(archive, first, status=ItemStatus.RUNNING, owner=alive, attempts=1,
               lease_until=datetime.now(timezone.utc) + timedelta(hours=1))
    report = jobs.run_task(archive, first)
    assert report.skipped_busy == 20 and not report.outcomes
    assert not jobs.reconcile(archive, recorder, queue_depth=0).redispatched  # a live claim is not lost work
    # once its lease expires it is anybody's
    _set_items(archive, first, lease_until=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert first in jobs.reconcile(archive, recorder, queue_depth=0).redispatched


def test_owner_is_dead() -> None:
    assert not jobs.owner_is_dead(jobs.process_owner())
    assert jobs.owner_is_dead(f"{socket.gethostname()}:{2**22 + 17}:1")
    assert jobs.owner_is_dead(f"{socket.gethostname()}:{os.getpid()}:not-my-start-time")  # pid reused
    assert not jobs.owner_is_dead("another-host:1:1")  # only its lease can expire
    assert jobs.owner_is_dead(None)


def _age_tasks(archive: Archive, seconds: float) -> None:
    with archive.unit_of_work() as uow:
        uow.session.execute(update(JobTask).values(created_at=datetime.now(timezone.utc) - timedelta(seconds=seconds)))
        uow.commit()


def test_reconciler_resends_lost_and_unsent_tasks(archive: Archive, study_files: Path) -> None:
    archive = Archive.open(dataclasses.replace(archive.settings, chunk_size=10))  # one task per series
    [job_id], _ = jobs.submit_paths(archive, [study_files], Recorder())
    with archive.unit_of_work() as uow:
        task_ids = jobs.job_task_ids(uow.session, job_id)
        uow.session.execute(update(JobTask).where(JobTask.id == task_ids[0]).values(dispatched_at=None))
        long_ago = datetime.now(timezone.utc) - timedelta(seconds=archive.settings.requeue_after + 5)
        uow.session.execute(update(JobTask).where(JobTask.id == task_ids[1]).values(dispatched_at=long_ago))
        uow.commit()
    recorder = Recorder()
    assert jobs.reconcile(archive, recorder, queue_depth=5).redispatched == []  # may be being sent right now
    _age_tasks(archive, 60)
    # the broker still holds messages: only a task never sent is sent
    report = jobs.reconcile(archive, recorder, queue_depth=5)
    assert report.redispatched == [task_ids[0]]
    report = jobs.reconcile(archive, recorder, queue_depth=0)
    assert report.redispatched == [task_ids[1]]
    with archive.unit_of_work() as uow:
        assert uow.session.get_one(JobTask, task_ids[1]).dispatches == 2


def test_a_broker_that_is_down_leaves_tasks_to_the_reconciler(archive: Archive, study_files: Path) -> None:
    import kombu.exceptions

    def down(task_id: int, lane: Lane) -> str:
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")

    [job_id], _ = jobs.submit_paths(archive, [study_files], down)
    _age_tasks(archive, 60)
    recorder = Recorder()
    report = jobs.reconcile(archive, recorder)
    with archive.unit_of_work() as uow:
        assert sorted(report.redispatched) == jobs.job_task_ids(uow.session, job_id)


def test_spool_moves_files_and_queues_each_task_once(archive: Archive, study_files: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    shutil.copytree(study_files, inbox)
    files = [(p, str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID))
             for p in sorted(inbox.rglob("*")) if p.is_file()]
    study_uid = str(pydicom.dcmread(files[0][0], stop_before_pixels=True).StudyInstanceUID)
    recorder = Recorder()
    job_id = spooling.spool_study(archive, inbox, study_uid, files, recorder)
    assert not any(p.is_file() for p in inbox.rglob("*"))
    with archive.unit_of_work() as uow:
        job = uow.session.get_one(Job, job_id)
        spool = Path(job.spool_dir or "")
        assert job.status is JobStatus.QUEUED and len(list(spool.rglob("*.MRDC.*"))) == 20
        assert sorted(recorder.sent) == jobs.job_task_ids(uow.session, job_id)
    for task_id in list(recorder.sent):
        jobs.run_task(archive, task_id)
    assert not spool.exists()  # released once every instance is archived
    with archive.unit_of_work() as uow:
        assert uow.session.get_one(Job, job_id).status is JobStatus.DONE


def test_a_watcher_killed_while_spooling_is_finished_on_restart(archive: Archive, study_files: Path,
                                                               tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    shutil.copytree(study_files, inbox)
    paths = sorted(p for p in inbox.rglob("*") if p.is_file())
    rels = [[str(p.relative_to(inbox)), None] for p in paths]
    with archive.unit_of_work() as uow:  # what spool_study records before it moves anything
        job = Job(kind="ingest", status=JobStatus.SPOOLING, study_uid="1.2.3", fingerprint="f" * 64,
                  params={"inbox": str(inbox), "files": rels, "codec": {"id": "jpegls"}})
        uow.session.add(job)
        uow.session.flush()
        job.spool_dir = str(archive.settings.spool_dir / f"job-{job.id}")
        uow.commit()
        job_id = job.id
    spool = Path(job.spool_dir)
    for path in paths[:7]:  # killed after moving seven files
        target = spool / path.relative_to(inbox)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    recorder = Recorder()
    assert spooling.resume_spooling(archive, recorder) == [job_id]
    assert spooling.resume_spooling(archive, recorder) == []  # once
    assert len([p for p in spool.rglob("*") if p.is_file()]) == 20
    with archive.unit_of_work() as uow:
        assert len(uow.session.scalars(select(JobItem).where(JobItem.job_id == job_id)).all()) == 20
        assert sorted(recorder.sent) == jobs.job_task_ids(uow.session, job_id)


def test_spool_is_kept_when_a_blob_went_missing(archive: Archive, study_files: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    shutil.copytree(study_files, inbox)
    files = [(p, None) for p in sorted(inbox.rglob("*")) if p.is_file()][:2]
    recorder = Recorder()
    job_id = spooling.spool_study(archive, inbox, "study", files, recorder)
    with archive.unit_of_work() as uow:
        uow.session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING))
        uow.commit()
    owner = jobs.process_owner()
    for task_id in recorder.sent:  # archive the chunk without finalizing the job yet
        with archive.unit_of_work() as uow:
            plan = executors._claim_chunk(archive, uow.session, task_id, uow.session.get_one(Job, job_id), owner, 2)
            uow.commit()
        assert executors._run_batch(archive, task_id, owner, jobs.TaskReport(task_id), plan) is False
    with archive.unit_of_work() as uow:
        header = uow.session.scalars(select(Instance.header_blob).where(Instance.job_id == job_id)).first()
    assert header is not None
    from archive.services.blobs import blob_refs

    with archive.unit_of_work() as uow:
        pack = blob_refs(uow.session, [header])[header].pack
    assert pack is not None
    (archive.store.packs.root / pack).unlink()  # a disk lost the pack between archiving and finalizing
    assert jobs.finalize_job(archive, job_id)
    with archive.unit_of_work() as uow:
        failed = uow.session.get_one(Job, job_id)
        assert failed.status is JobStatus.FAILED and "missing" in (failed.error or "")
        assert len([p for p in Path(failed.spool_dir or "").rglob("*") if p.is_file()]) == 2  # kept


def test_instance_deadline_interrupts_a_slow_instance() -> None:
    """The timer is asserted, not waited for: the alarm armed, its expiry raising, and disarmed afterwards."""
    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(InstanceTimeLimitExceeded, match="0.2 s"):
        with jobs.instance_deadline(0.2):
            remaining, interval = signal.getitimer(signal.ITIMER_REAL)
            assert 0 < remaining <= 0.2 and interval == 0  # one shot, due within the limit
            signal.raise_signal(signal.SIGALRM)  # what the kernel sends when the limit is reached
            pytest.fail("the expired deadline did not interrupt the instance")
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) == before
    with jobs.instance_deadline(30):  # a fast one is untouched, and the alarm is off afterwards
        assert 29 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) == before
    with jobs.instance_deadline(0):  # no limit: no alarm at all
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_two_jobs_of_the_same_files_committing_at_once_store_each_instance_once(
    archive: Archive, study_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers' batches of the same SOP instances reach the catalog together: the loser runs its batch
    again (PostgreSQL: a unique violation; SQLite: it waits for the write lock) and records duplicates."""
    import threading

    from sqlalchemy import func

    from archive.catalog.models import Series
    from archive.services import totals

    recorder = Recorder()
    [first], _ = jobs.submit_paths(archive, [study_files], recorder)
    [second], _ = jobs.submit_paths(archive, [study_files], recorder)
    with archive.unit_of_work() as uow:
        tasks = [jobs.job_task_ids(uow.session, job_id) for job_id in (first, second)]
    assert len(tasks[0]) == len(tasks[1]) == 1  # both series in one task each

    both_staged = threading.Barrier(2, timeout=60)

    def together(*args: object, **kwargs: object) -> object:
        both_staged.wait()  # both chunks staged (each saw nothing archived) before either commits
        return totals.write_counted(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(executors, "write_counted", together)
    errors: list[BaseException] = []

    def run(task_id: int) -> None:
        try:
            jobs.run_task(archive, task_id)
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t[0],)) for t in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    items = _items(archive, first) + _items(archive, second)
    assert {i.status for i in items} == {ItemStatus.DONE}
    outcomes = sorted(str(i.outcome.value if i.outcome else None) for i in items)
    assert outcomes == ["duplicate"] * 20 + ["stored"] * 20
    with archive.unit_of_work() as uow:
        assert uow.session.scalar(select(func.count()).select_from(Instance)) == 20
        study = uow.session.scalars(select(Study)).one()
        assert (study.num_series, study.num_instances) == (2, 20)
        assert {s.num_instances for s in uow.session.scalars(select(Series))} == {10}
        assert {uow.session.get_one(Job, j).status for j in (first, second)} == {JobStatus.DONE}
