"""Normalization in the pipeline: the same job as ingest (direct and through the job protocol), generations,
variants, totals, the switch, the scheduled sweep and the commands — on a real archive and real CT."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from archive.catalog.models import Derivation, Instance, Job, JobStatus, Series, Study
from archive.config import Settings
from archive.kinds import JobKind, Lane, NormalizeOutcome, Variant
from archive.normalize.profiles import DEFAULT_PROFILES, NormalizeProfile
from archive.services import jobs
from archive.services.ingest import ingest_paths
from archive.services.normalization import normalize_studies
from archive.services.query import show_study
from archive.services.retrieve import retrieve
from archive.services.runtime import Archive
from archive.services.sweeps import start_normalize_sweep
from tests.conftest import shared_data
from tests.integration.test_cli import medarchive
from tests.synthetic import resampled_ct


def _profiles(**ct_changes: object) -> tuple[NormalizeProfile, ...]:
    return tuple(dataclasses.replace(p, **ct_changes) if p.name == "ct" else p for p in DEFAULT_PROFILES)


def _open(tmp_path: Path, database_url: str | None = None, **overrides: object) -> Archive:
    extra = {"database_url": database_url} if database_url else {}
    return Archive.open(Settings.load(environ={}, home=tmp_path / "home", **extra, **overrides), migrate=True)


# real 512² CT: an axial slice (0.8125 mm) and a coronal reformat (0.8125 mm) of one study, and a coronal
# reformat at 1.32 mm that the shipped CT profile must not enlarge
CT_FILES = ("A048383/axial/19001231-30.dcm", "A048383/coronal/19001231-057.dcm", "A002304/coronal/19001231-076.dcm")


@pytest.fixture
def ct_folder(tmp_path: Path) -> Path:
    """Three real CT series, and a 616² slice at 0.87 mm made from a real one (four studies' worth of series)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in CT_FILES:
        shutil.copyfile(shared_data() / "ct-chest-tcia" / name, folder / name.replace("/", "-"))
    resampled_ct(folder / "big", matrix=616, spacing_mm=0.87)
    return folder


@pytest.fixture
def archive_pg_or_sqlite(tmp_path: Path, database_url: str) -> Iterator[Archive]:
    opened = _open(tmp_path, database_url)
    yield opened
    opened.close()


def _derived(archive: Archive) -> list[tuple[str, str, int, bool]]:
    with archive.unit_of_work() as uow:
        return [(s.series_uid, d.profile, d.generation, d.is_current) for s, d in uow.session.execute(
            select(Series, Derivation).join(Derivation, Derivation.series_id == Series.id).order_by(Derivation.id))]


def test_ingest_normalizes_in_the_same_job_and_a_rerun_adds_nothing(archive_pg_or_sqlite: Archive,
                                                                   ct_folder: Path, tmp_path: Path) -> None:
    archive = archive_pg_or_sqlite
    report = ingest_paths(archive, [ct_folder])
    made = [n for n in report.normalized if n.outcome is NormalizeOutcome.NORMALIZED]
    assert len(made) == 3 and all(n.profile == "ct" for n in made), [n.as_dict() for n in report.normalized]
    [coarse] = [n for n in report.normalized if n.outcome is NormalizeOutcome.SKIPPED]
    assert "acquired at 1.32202 mm, coarser than the 0.976562 mm of profile ct" in coarse.reason, coarse.reason
    assert all(n.rmse is not None and n.rmse > 0 and n.max_abs_error is not None for n in made)
    with archive.unit_of_work() as uow:
        job = uow.session.get(Job, report.job_id)
        assert job is not None and job.status is JobStatus.DONE and job.counts["normalized_series"] == 3
        derived = uow.session.scalars(select(Series).where(Series.derived_from_id.is_not(None))).all()
        assert len(derived) == 3
        for series in derived:  # every derived instance points at its source instance, in the source series
            for instance in series.instances:
                source = uow.session.get(Instance, instance.derived_from_id)
                assert source is not None and source.series_id == series.derived_from_id
                assert (instance.rows, instance.columns) == (512, 512)
        # study totals count the originals; the derived series are counted apart
        studies = uow.session.scalars(select(Study)).all()
        assert sum(s.num_series for s in studies) == 4 and sum(s.num_instances for s in studies) == 4
        assert sum(s.num_derived_series for s in studies) == 3 and sum(s.num_derived_instances for s in studies) == 3
        assert all(s.bytes_derived > 0 for s in studies if s.num_derived_series)
        series_before = uow.session.scalar(select(func.count()).select_from(Series))

    again = ingest_paths(archive, [ct_folder])
    assert {n.outcome for n in again.normalized} == {NormalizeOutcome.UNCHANGED, NormalizeOutcome.SKIPPED}
    assert NormalizeOutcome.NORMALIZED not in {r.outcome for r in normalize_studies(archive)}
    with archive.unit_of_work() as uow:
        assert uow.session.scalar(select(func.count()).select_from(Series)) == series_before


def test_a_changed_profile_is_a_new_generation_and_variants_choose_what_is_retrieved(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in CT_FILES[:2]:  # one study, two series
        shutil.copyfile(shared_data() / "ct-chest-tcia" / name, folder / name.replace("/", "-"))
    first = _open(tmp_path)
    [study_uid] = ingest_paths(first, [folder]).studies
    generation_1 = {uid for uid, *_ in _derived(first)}
    assert len(generation_1) == 2
    first.close()

    changed = _open(tmp_path, normalize_profiles=_profiles(rows=384, columns=384))
    results = normalize_studies(changed, study_uids=[study_uid])
    assert [r.outcome for r in results] == [NormalizeOutcome.NORMALIZED] * 2
    history = _derived(changed)
    assert sorted((g, c) for _, _, g, c in history) == [(1, False), (1, False), (2, True), (2, True)]
    current = {uid for uid, _, _, is_current in history if is_current}

    out = tmp_path / "out"
    normalized = retrieve(changed, study_uid, out / "n", variant=Variant.NORMALIZED)
    originals = retrieve(changed, study_uid, out / "o")
    both = retrieve(changed, study_uid, out / "a", variant=Variant.ALL)
    assert len(normalized.files) == 2 and len(originals.files) == 2 and len(both.files) == 4
    for f in normalized.files:
        ds = pydicom.dcmread(f.path)
        assert ds.SeriesInstanceUID in current and (ds.Rows, ds.Columns) == (384, 384)
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    for f in originals.files:
        assert pydicom.dcmread(f.path).SeriesInstanceUID not in {uid for uid, *_ in history}
    changed.close()

    # the earlier profile again: its kept series become current again, nothing is added
    again = _open(tmp_path)
    assert [r.outcome for r in normalize_studies(again, study_uids=[study_uid])] == [NormalizeOutcome.UNCHANGED] * 2
    assert {uid for uid, _, _, is_current in _derived(again) if is_current} == generation_1
    shown = show_study(again, study_uid)
    assert sorted((s["derivation"]["generation"], s["derivation"]["current"]) for s in shown["series"]
                  if s["derivation"]) == [(1, True), (1, True), (2, False), (2, False)]
    assert shown["num_series"] == 2 and shown["derived_series"] == 4
    again.close()


def test_normalization_off_then_the_sweep_catches_up_through_the_job_protocol(tmp_path: Path,
                                                                            ct_folder: Path) -> None:
    off = _open(tmp_path, normalize=False)
    report = ingest_paths(off, [ct_folder])
    assert report.normalized == []
    assert start_normalize_sweep(off, lambda task_id, lane: "x").action == "normalization is off"
    off.close()

    on = _open(tmp_path)

    def inline(task_id: int, lane: Lane) -> str:
        jobs.run_task(on, task_id)
        return f"inline-{task_id}"

    sweep = start_normalize_sweep(on, inline)
    assert sweep.action == "started" and sweep.instances == 4  # the coarse reformat is tried, and skipped
    with on.unit_of_work() as uow:
        job = uow.session.get(Job, sweep.job_id)
        assert job is not None and job.kind is JobKind.NORMALIZE and job.status is JobStatus.DONE
        assert job.counts.get("normalized") == 3 and job.counts.get("skipped") == 1, job.counts
    assert len(_derived(on)) == 3
    assert start_normalize_sweep(on, inline).action == "nothing to do"  # seen by this profile version
    on.close()


def test_a_worker_ingest_job_normalizes_before_it_is_done(tmp_path: Path, ct_folder: Path) -> None:
    archive = _open(tmp_path)

    def inline(task_id: int, lane: Lane) -> str:
        jobs.run_task(archive, task_id)
        return f"inline-{task_id}"

    job_ids, _ = jobs.submit_paths(archive, [ct_folder], inline)
    with archive.unit_of_work() as uow:
        finished = uow.session.scalars(select(Job).where(Job.id.in_(job_ids))).all()
        assert all(j.status is JobStatus.DONE for j in finished)
        assert sum(j.counts.get("normalized_series", 0) for j in finished) == 3
    assert len(_derived(archive)) == 3
    archive.close()


def test_the_commands(tmp_path: Path, ct_folder: Path) -> None:
    home = tmp_path / "home"
    ingested = medarchive(home, "ingest", "--json", str(ct_folder), normalize=None)  # as shipped
    assert ingested.returncode == 0, ingested.stderr
    normalized = json.loads(ingested.stdout)["normalized"]
    assert sorted(n["outcome"] for n in normalized) == ["normalized"] * 3 + ["skipped"]
    study_uid = sorted(json.loads(ingested.stdout)["studies"])[0]

    dry = medarchive(home, "normalize", "--dry-run", "--profile", "ct", "--study", study_uid, normalize=None)
    assert dry.returncode == 0 and "unchanged" in dry.stdout, dry.stdout + dry.stderr
    listed = medarchive(home, "studies")
    assert "norm" in listed.stdout and "normalized series, counted apart" in listed.stdout, listed.stdout
    shown = medarchive(home, "show", study_uid)
    assert "normalized (ct, gen 1)" in shown.stdout and "derived (not counted above)" in shown.stdout, shown.stdout
    got = medarchive(home, "get", study_uid, "--variant", "normalized", "--out", str(tmp_path / "got"))
    assert got.returncode == 0, got.stderr
    files = sorted((tmp_path / "got").rglob("*.dcm"))
    assert files and all(pydicom.dcmread(f).DerivationDescription.startswith("medarchive") for f in files)
    off = medarchive(home, "normalize", "--profile", "nosuch")
    assert off.returncode == 2 and "no normalize profile 'nosuch'" in off.stderr
    exported = medarchive(home, "export", study_uid, "--format", "npz", "--out", str(tmp_path / "npz"), "--json")
    assert exported.returncode == 0, exported.stderr
    assert all(Path(v["path"]).exists() for v in json.loads(exported.stdout) if not v["notes"])


def test_corrections_reach_the_normalized_copies_and_deleting_a_source_takes_them(tmp_path: Path) -> None:
    from archive.services.corrections import update_attributes
    from archive.services.deletion import delete_series, delete_study
    from archive.services.integrity import verify_blobs

    folder = tmp_path / "in"
    folder.mkdir()
    for name in CT_FILES[:2]:
        shutil.copyfile(shared_data() / "ct-chest-tcia" / name, folder / name.replace("/", "-"))
    archive = _open(tmp_path)
    [study_uid] = ingest_paths(archive, [folder]).studies
    update_attributes(archive, study_uid, {"PatientName": "CORRECTED^NAME"}, reason="wrong patient name")
    got = retrieve(archive, study_uid, tmp_path / "n", variant=Variant.NORMALIZED)
    assert len(got.files) == 2
    assert {str(pydicom.dcmread(f.path).PatientName) for f in got.files} == {"CORRECTED^NAME"}

    shown = show_study(archive, study_uid)
    original = next(s for s in shown["series"] if s["derived_from"] is None)
    delete_series(archive, original["series_uid"], reason="test")
    shown = show_study(archive, study_uid)
    assert len(shown["series"]) == 2 and shown["num_series"] == 1 and shown["derived_series"] == 1
    assert all(s["derived_from"] != original["series_uid"] for s in shown["series"])
    delete_study(archive, study_uid, reason="test")
    with archive.unit_of_work() as uow:
        assert uow.session.scalar(select(func.count()).select_from(Derivation)) == 0
        assert uow.session.scalar(select(func.count()).select_from(Series)) == 0
    assert not verify_blobs(archive).problems
    archive.close()


def test_profiles_see_where_a_job_came_from() -> None:
    from archive.services.normalization import job_sources

    watched = Job(kind=JobKind.INGEST, params={"inbox": "/srv/inbox", "files": [["research/p1/a.dcm", "1.2"],
                                                                                 ["research/p1/b.dcm", "1.2"]]})
    assert job_sources(watched) == ["/srv/inbox/research/p1"]
    network = Job(kind=JobKind.INGEST, params={"paths": ["/x"], "calling_ae": "CT_SCANNER", "token": "lab"})
    assert job_sources(network) == ["/x", "ae:CT_SCANNER", "token:lab"]
    research = NormalizeProfile("research", modalities=("CT",), sources=("/srv/inbox/research/*",), spacing_mm=1.0)
    from archive.normalize.profiles import SeriesFacts

    assert research.matches(SeriesFacts(modality="CT", sources=tuple(job_sources(watched))))
    assert not research.matches(SeriesFacts(modality="CT", sources=tuple(job_sources(network))))


def test_two_processes_normalize_what_one_does(tmp_path: Path, ct_folder: Path) -> None:
    """Small series go to the processes whole; a big one (16 slices) is split between them and committed once."""
    from tests.synthetic import ct_stack

    ct_stack(ct_folder / "stack", slices=16, spacing_mm=2.0)
    one = _open(tmp_path / "one")
    two = _open(tmp_path / "two")
    first = ingest_paths(one, [ct_folder], jobs=1)
    second = ingest_paths(two, [ct_folder], jobs=2)

    def summary(report: object) -> list[tuple[object, ...]]:
        return sorted((n.derived_series_uid, n.outcome.value, n.instances, round(n.rmse or 0, 3),
                       round(n.max_abs_error or 0, 3)) for n in report.normalized)  # type: ignore[attr-defined]

    assert summary(first) == summary(second)
    assert max(n.instances for n in second.normalized) == 16
    pixels = {}
    for archive, report in ((one, first), (two, second)):
        got = [retrieve(archive, uid, tmp_path / f"out-{id(archive)}" / uid, variant=Variant.NORMALIZED)
               for uid in sorted(report.studies)]
        pixels[id(archive)] = sorted((pydicom.dcmread(f.path).SOPInstanceUID, pydicom.dcmread(f.path).pixel_array.tobytes())
                                     for r in got for f in r.files)
        with archive.unit_of_work() as uow:
            derivation = uow.session.scalars(select(Derivation).where(Derivation.num_instances == 16)).one()
            assert derivation.source_geometry["instances"] == 16 and derivation.error_pixels
    assert pixels[id(one)] == pixels[id(two)] and len(pixels[id(one)]) == 3 + 16
    one.close()
    two.close()
