"""The watcher's decisions on real files, with a hand-driven clock: ready files, stable studies, the spool."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from archive.catalog.models import Job, JobItem
from archive.kinds import Lane
from archive.services.runtime import Archive
from archive.watcher import InboxWatcher, is_ignored
from tests.conftest import shared_data


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sqlite_watch(sqlite_archive: Archive, tmp_path: Path) -> tuple[InboxWatcher, Clock, list[int], Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    clock = Clock()
    sent: list[int] = []

    def dispatcher(task_id: int, lane: Lane) -> str:
        assert lane is Lane.DEFAULT  # the archive's codec (jpegls) runs no model
        sent.append(task_id)
        return str(task_id)

    watcher = InboxWatcher(sqlite_archive, inbox, dispatcher, stable_age=60, file_settle=2, rescan_interval=30,
                           clock=clock)
    return watcher, clock, sent, inbox


def _localizer() -> list[Path]:
    return sorted((shared_data() / "mr-ge-signa" / "01_3_Plane_Localizer_FF").iterdir())


def test_ignored_names() -> None:
    assert all(is_ignored(n) for n in (".DS_Store", ".hidden.dcm", "a.dcm~", "a.dcm.part", "x.tmp", "Thumbs.db"))
    assert not any(is_ignored(n) for n in ("IM0001", "a.dcm", "i18246584.MRDC.15"))


def test_a_study_is_queued_once_it_is_stable(sqlite_watch: tuple[InboxWatcher, Clock, list[int], Path]) -> None:
    watcher, clock, sent, inbox = sqlite_watch
    files = _localizer()
    for path in files[:10]:
        shutil.copyfile(path, inbox / path.name)
    (inbox / ".DS_Store").write_bytes(b"x")
    watcher.scan()
    assert len(watcher.pending) == 10  # the hidden file is not even tracked
    clock.now += 1
    assert watcher.tick() == [] and len(watcher.pending) == 10  # not settled yet
    clock.now += 2
    assert watcher.tick() == [] and not watcher.pending  # ready, waiting for the study to be stable
    clock.now += 50
    for path in files[10:]:  # more of the same study: the stable age starts again
        shutil.copyfile(path, inbox / path.name)
    watcher.scan()
    clock.now += 3
    assert watcher.tick() == []
    clock.now += 59
    assert watcher.tick() == []
    clock.now += 1
    queued = watcher.tick()
    assert len(queued) == 1
    assert sorted(p.name for p in inbox.iterdir()) == [".DS_Store"]
    with watcher.archive.unit_of_work() as uow:
        job = uow.session.get_one(Job, queued[0])
        assert len(uow.session.scalars(select(JobItem).where(JobItem.job_id == job.id)).all()) == 21
        assert job.study_uid and Path(job.spool_dir or "").is_dir()
    assert len(sent) == 1  # one series of 21 instances: one task (chunk_size 32)
    clock.now += 1000
    assert watcher.tick() == []  # never twice


def test_a_growing_file_is_not_ready(sqlite_watch: tuple[InboxWatcher, Clock, list[int], Path]) -> None:
    watcher, clock, _sent, inbox = sqlite_watch
    data = _localizer()[0].read_bytes()
    target = inbox / "slow.dcm"
    target.write_bytes(data[:1000])
    watcher.scan()
    for end in (5000, 20000, len(data)):
        clock.now += 1.5
        with target.open("ab") as handle:
            handle.write(data[target.stat().st_size:end])
        watcher.observe(target)
        watcher.tick()
        assert target in watcher.pending  # its size keeps changing
    clock.now += 2
    watcher.tick()
    assert not watcher.pending and sum(len(s.files) for s in watcher.arriving.values()) == 1


def test_unreadable_files_form_their_own_job(sqlite_watch: tuple[InboxWatcher, Clock, list[int], Path]) -> None:
    watcher, clock, _sent, inbox = sqlite_watch
    (inbox / "notes.txt").write_text("not an image")
    shutil.copyfile(_localizer()[0], inbox / "one.dcm")
    watcher.scan()
    clock.now += 3
    watcher.tick()
    assert set(watcher.arriving) == {"", "1.2.840.113619.6.495.211924749867037572488987328218167241798"}
    clock.now += 61
    assert len(watcher.tick()) == 2


def test_spooled_jobs_stays_bounded_over_many_studies(sqlite_archive: Archive, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    clock = Clock()
    sent: list[int] = []

    def dispatcher(task_id: int, lane: Lane) -> str:
        assert lane is Lane.DEFAULT  # the archive's codec (jpegls) runs no model
        sent.append(task_id)
        return str(task_id)

    watcher = InboxWatcher(sqlite_archive, inbox, dispatcher, stable_age=60, file_settle=2, clock=clock,
                           recent_jobs=4)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    queued: list[int] = []
    for round_ in range(5):  # 5 rounds of 3 new studies each: 15 jobs, far more than the 4 remembered
        for n in range(3):
            template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            template.save_as(inbox / f"r{round_}-s{n}.dcm")
        watcher.scan()
        clock.now += 3
        assert watcher.tick() == []  # ready, not yet stable
        clock.now += 60
        now_queued = watcher.tick()
        assert len(now_queued) == 3
        queued += now_queued
        assert list(watcher.spooled_jobs) == queued[-4:]  # the newest, in order
        assert not watcher.pending and not watcher.arriving  # nothing else is kept per study either
    assert len(watcher.spooled_jobs) == 4 and len(set(queued)) == 15 and len(sent) == 15
    with sqlite_archive.unit_of_work() as uow:  # the catalog, not the watcher, is the record of every job
        assert set(uow.session.scalars(select(Job.id))) == set(queued)
    assert not [p for p in inbox.iterdir()]
