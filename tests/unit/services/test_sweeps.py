"""Re-compression sweeps: throttled, confined to their window, resumable from the catalog."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from archive.catalog.models import Encoding, ItemStatus, Job, JobItem, JobStatus
from archive.config import RecompressPolicy
from archive.kinds import Lane
from archive.services import jobs
from archive.services.ingest import ingest_paths
from archive.services.runtime import Archive
from archive.services.sweeps import start_sweep
from tests.conftest import shared_data


@pytest.fixture
def ct_archive(archive: Archive, tmp_path: Path) -> Archive:
    folder = tmp_path / "ct"
    folder.mkdir()
    for path in sorted(p for p in (shared_data() / "ct-chest-tcia").rglob("*") if p.is_file())[:5]:
        shutil.copyfile(path, folder / f"{path.parent.parent.name}-{path.parent.name}-{path.name}")
    ingest_paths(archive, [folder])
    policy = RecompressPolicy(name="night", codec={"id": "jpegxl", "effort": 3}, modalities=("CT",),
                              from_codecs=("jpegls",), window="01:00-05:00", batch_size=3)
    return Archive.open(dataclasses.replace(archive.settings, policies={"night": policy}))


class Recorder:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def __call__(self, task_id: int, lane: Lane) -> str:
        assert lane is Lane.DEFAULT  # these jobs' codecs run no model (tests/unit/services/test_lanes.py)
        self.sent.append(task_id)
        return str(task_id)


def test_window_wraps_midnight() -> None:
    policy = RecompressPolicy(name="p", codec={"id": "zstd"}, window="22:00-04:00")
    assert policy.in_window(datetime(2026, 1, 1, 23, 0).time()) and policy.in_window(datetime(2026, 1, 1, 3).time())
    assert not policy.in_window(datetime(2026, 1, 1, 12).time())
    assert RecompressPolicy(name="p", codec={"id": "zstd"}).in_window(datetime(2026, 1, 1, 12).time())


def test_sweep_outside_its_window_does_nothing(ct_archive: Archive) -> None:
    recorder = Recorder()
    report = start_sweep(ct_archive, "night", recorder, now=datetime(2026, 1, 1, 12, 0))
    assert report.action == "outside window" and not recorder.sent


def test_sweep_is_throttled_and_resumed_not_replaced(ct_archive: Archive) -> None:
    recorder = Recorder()
    night = datetime(2026, 1, 1, 2, 0)
    first = start_sweep(ct_archive, "night", recorder, now=night)
    assert (first.action, first.instances) == ("started", 3)  # batch_size is the throttle
    again = start_sweep(ct_archive, "night", recorder, now=night)
    assert (again.action, again.job_id, again.instances) == ("resumed", first.job_id, 3)
    # run it by hand, ignoring the window, the way `medarchive recompress` does
    with ct_archive.unit_of_work() as uow:
        uow.session.get_one(Job, first.job_id).params = {**uow.session.get_one(Job, first.job_id).params,
                                                          "respect_window": False}
        uow.commit()
    for task_id in sorted(set(recorder.sent)):
        jobs.run_task(ct_archive, task_id)
    with ct_archive.unit_of_work() as uow:
        assert uow.session.get_one(Job, first.job_id).status is JobStatus.DONE
        assert sum(e.codec_id == "jpegxl" for e in uow.session.scalars(select(Encoding).where(Encoding.is_current))) == 3
    nxt = start_sweep(ct_archive, "night", recorder, now=night)
    assert (nxt.action, nxt.instances) == ("started", 2)  # the rest
    assert start_sweep(ct_archive, "night", Recorder(), now=night).action == "resumed"


def test_workers_leave_items_queued_outside_the_window(ct_archive: Archive) -> None:
    policy = dataclasses.replace(ct_archive.settings.policies["night"], window=_window_excluding_now())
    archive = Archive.open(dataclasses.replace(ct_archive.settings, policies={"night": policy}))
    recorder = Recorder()
    report = start_sweep(archive, "night", recorder, respect_window=False)
    assert report.action == "started"
    with archive.unit_of_work() as uow:  # now make the job one that respects its (closed) window
        job = uow.session.get_one(Job, report.job_id)
        job.params = {**job.params, "respect_window": True}
        uow.commit()
    reports = [jobs.run_task(archive, task_id) for task_id in recorder.sent]
    assert sum(r.deferred for r in reports) == 3 and not any(r.outcomes for r in reports)
    with archive.unit_of_work() as uow:
        statuses = {i.status for i in uow.session.scalars(select(JobItem).where(JobItem.job_id == report.job_id))}
        assert statuses == {ItemStatus.QUEUED}
    assert not jobs.reconcile(archive, recorder, queue_depth=0).redispatched  # nor re-sent while closed


def _window_excluding_now() -> str:
    hour = (datetime.now().hour + 2) % 24
    return f"{hour:02d}:00-{(hour + 1) % 24:02d}:00"
