"""Lossy representations are honest DICOM and never lose the original by accident (real CT and MR)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from archive.catalog.models import Blob, Derivation, Encoding, Instance, InstanceStatus
from archive.config import RecompressPolicy
from archive.errors import ConfigError, LossyOnlyError
from archive.kinds import DerivationKind, ItemOutcome, Lane, Variant
from archive.services.ingest import Outcome, ingest_paths
from archive.services.integrity import collect_garbage, verify_blobs
from archive.services.lossy import derive_lossy, lossy_method, policy_codec
from archive.services.recompress import plan, recompress_instance, select_candidates
from archive.services.retrieve import read_frame, retrieve
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import stored_values

NEAR2 = {"id": "jpegls", "near": 2}
CT = shared_data() / "ct-chest-tcia" / "A002304" / "axial"


def _ingest(archive: Archive, folder: Path, sources: list[Path]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = {}
    for source in sources:
        target = folder / source.name
        shutil.copyfile(source, target)
        copies[str(dcmread(target, stop_before_pixels=True).SOPInstanceUID)] = target
    report = ingest_paths(archive, list(copies.values()))
    assert all(o.outcome is Outcome.STORED for o in report.outcomes), report.outcomes
    return copies


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(stored_values(dcmread(path)))


def _ids(archive: Archive) -> dict[str, int]:
    with archive.unit_of_work() as uow:
        return dict(uow.session.execute(select(Instance.sop_instance_uid, Instance.id)
                                        .where(Instance.derived_from_id.is_(None))).all())


def test_lossy_target_makes_a_derived_instance_and_keeps_the_original(sqlite_archive: Archive, tmp_path: Path) -> None:
    archive = sqlite_archive
    sources = sorted(CT.glob("*.dcm"))[:2]
    copies = _ingest(archive, tmp_path / "in", sources)
    policy = RecompressPolicy(name="near2", codec=NEAR2)
    with archive.unit_of_work() as uow:
        dry = plan(uow.session, policy)
    assert dry.lossy and dry.keep_lossless and dry.instances == 2 and "kept" in dry.words
    for sop, instance_id in _ids(archive).items():
        result = recompress_instance(archive, instance_id, policy)
        assert result.outcome is ItemOutcome.RECOMPRESSED, result.reason
        again = recompress_instance(archive, instance_id, policy)
        assert again.outcome is ItemOutcome.UNCHANGED
        # the original is untouched and still bit-exact under its own UID
        assert np.array_equal(read_frame(archive, sop, 0), _pixels(copies[sop]))
    with archive.unit_of_work() as uow:
        assert select_candidates(uow.session, policy, limit=None) == []
        derivations = uow.session.scalars(select(Derivation)).all()  # these CT slices are one-instance series
        assert len(derivations) == 2
        assert all(d.kind is DerivationKind.LOSSY and d.num_instances == 1 and d.is_current for d in derivations)
        lossy_rows = uow.session.scalars(select(Encoding).where(Encoding.kind == "lossy")).all()
        assert len(lossy_rows) == 2 and all(e.max_error_bound == 2 and (e.max_abs_error or 0) <= 2 for e in lossy_rows)

    studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in sources}
    files = [f for study in studies for f in retrieve(archive, study, tmp_path / "lossy", variant=Variant.LOSSY).files]
    assert len(files) == 2
    for written in files:
        ds = dcmread(written.path)
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == "ISO_14495_1"
        assert float(ds.LossyImageCompressionRatio) > 1
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        source_uid = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source_uid in copies and ds.SOPInstanceUID != source_uid
        assert ds.DerivationCodeSequence[0].CodeValue == "113040"
        error = np.abs(ds.pixel_array.astype(np.int32) - _pixels(copies[source_uid]).astype(np.int32))
        assert 0 < error.max() <= 2


def test_keep_lossless_false_releases_the_original_and_get_says_so(sqlite_archive: Archive, tmp_path: Path) -> None:
    archive = sqlite_archive
    sources = sorted(CT.glob("*.dcm"))[:1]
    copies = _ingest(archive, tmp_path / "in", sources)
    (sop, instance_id), = _ids(archive).items()
    policy = RecompressPolicy(name="near2-release", codec=NEAR2, keep_lossless=False)
    with archive.unit_of_work() as uow:
        dry = plan(uow.session, policy)
    assert "WILL BE RELEASED" in dry.words
    result = recompress_instance(archive, instance_id, policy)
    assert result.outcome is ItemOutcome.RECOMPRESSED and "released" in result.reason
    with archive.unit_of_work() as uow:
        original = uow.session.get(Instance, instance_id)
        assert original is not None and original.status is InstanceStatus.LOSSY_ONLY
        study = original.series.study
        assert study.num_instances == 1 and study.num_derived_instances == 1  # still one of its instances
    with pytest.raises(LossyOnlyError, match="only a lossy derivative is held"):
        read_frame(archive, sop, 0)
    study_uid = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    withheld = retrieve(archive, study_uid, tmp_path / "plain")
    assert withheld.files == [] and withheld.lossy_only[0][0] == sop and withheld.lossy_only[0][1]
    given = retrieve(archive, study_uid, tmp_path / "allowed", allow_lossy=True)
    assert len(given.files) == 1 and given.files[0].sop_instance_uid == withheld.lossy_only[0][1]
    ds = dcmread(given.files[0].path)
    assert ds.LossyImageCompression == "01" and ds.SOPInstanceUID != sop
    assert np.abs(ds.pixel_array.astype(np.int32) - _pixels(copies[sop])).max() <= 2
    # the released frames go to the collector; the derivative and its blobs stay intact
    report = collect_garbage(archive, grace_seconds=0)
    assert report.blob_rows >= 1
    assert verify_blobs(archive).problems == []
    assert retrieve(archive, study_uid, tmp_path / "after-gc", allow_lossy=True).files


def test_quality_floor_keeps_the_instance_lossless(sqlite_archive: Archive, tmp_path: Path) -> None:
    archive = sqlite_archive
    _ingest(archive, tmp_path / "in", sorted(CT.glob("*.dcm"))[:1])
    (_, instance_id), = _ids(archive).items()
    policy = RecompressPolicy(name="too-strict", codec=NEAR2, keep_lossless=False, min_psnr=200.0)
    result = recompress_instance(archive, instance_id, policy)
    assert result.outcome is ItemOutcome.SKIPPED and "kept lossless" in result.reason and "floor" in result.reason
    with archive.unit_of_work() as uow:
        assert uow.session.get(Instance, instance_id).status is InstanceStatus.STORED  # type: ignore[union-attr]
        assert uow.session.scalar(select(func.count()).select_from(Derivation)) == 0


def test_the_archive_codec_must_be_lossless(sqlite_archive: Archive, tmp_path: Path) -> None:
    source = sorted(CT.glob("*.dcm"))[0]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(source, folder / source.name)
    with pytest.raises(ConfigError, match="must be lossless"):
        ingest_paths(sqlite_archive, [folder], codec_config=NEAR2)
    with sqlite_archive.unit_of_work() as uow:
        assert uow.session.scalar(select(func.count()).select_from(Blob)) == 0


def test_lossy_method_names() -> None:
    assert lossy_method({"id": "jpegls", "near": 2}) == "ISO_14495_1"
    assert lossy_method({"id": "pca", "variance": 0.98}) == "MEDARCHIVE_PCA"
    assert lossy_method({"id": "bounded", "inner": {"id": "kmeans", "k": 64}, "max_error": 2}) == \
        "MEDARCHIVE_BOUNDED_KMEANS"


def test_series_basis_is_a_context_blob_the_collector_keeps(sqlite_archive: Archive, tmp_path: Path) -> None:
    """pca fits one basis per series (a context blob named by every frame); GC and verify count it as referenced."""
    archive = sqlite_archive
    series = sorted((shared_data() / "mr-siemens-prisma").rglob("*.dcm"))[:5]
    copies = _ingest(archive, tmp_path / "in", series)
    policy = RecompressPolicy(name="pca", codec={"id": "pca", "variance": 0.999})
    for instance_id in _ids(archive).values():
        assert recompress_instance(archive, instance_id, policy).outcome is ItemOutcome.RECOMPRESSED
    with archive.unit_of_work() as uow:
        contexts = set(uow.session.scalars(select(Encoding.context_blob).where(Encoding.kind == "lossy")))
    assert len(contexts) == 1 and None not in contexts  # one basis for the series
    collect_garbage(archive, grace_seconds=0)
    assert verify_blobs(archive).problems == []
    study = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    files = retrieve(archive, study, tmp_path / "out", variant=Variant.LOSSY).files
    assert len(files) == len(copies)
    for written in files:
        ds = dcmread(written.path)
        assert ds.LossyImageCompressionMethod == "MEDARCHIVE_PCA"
        original = _pixels(copies[ds.SourceImageSequence[0].ReferencedSOPInstanceUID])
        assert ds.pixel_array.shape == original.shape
        difference = ds.pixel_array.astype(np.float64) - original
        assert 0 < np.sqrt(np.mean(difference**2)) < 0.05 * float(np.ptp(original))  # lossy, no bound promised


def test_a_sweep_does_not_retry_what_its_floor_kept_lossless(sqlite_archive: Archive, tmp_path: Path) -> None:
    """The job records why an instance stayed lossless; the next sweep with the same codec and floors skips it,
    a changed floor tries it again."""
    import dataclasses

    from archive.services import jobs
    from archive.services.sweeps import start_sweep

    _ingest(sqlite_archive, tmp_path / "in", sorted(CT.glob("*.dcm"))[:1])
    strict = RecompressPolicy(name="floor", codec=NEAR2, min_psnr=200.0)
    archive = Archive.open(dataclasses.replace(sqlite_archive.settings, policies={"floor": strict}))
    try:
        def run_inline(task_id: int, lane: Lane) -> str:
            jobs.run_task(archive, task_id)
            return f"inline-{task_id}"

        first = start_sweep(archive, "floor", run_inline, respect_window=False)
        assert first.action == "started" and first.instances == 1
        with archive.unit_of_work() as uow:
            assert select_candidates(uow.session, strict, limit=None) == []  # kept lossless, with the reason
        assert start_sweep(archive, "floor", run_inline, respect_window=False).instances == 0
        relaxed = dataclasses.replace(strict, min_psnr=60.0)
        with archive.unit_of_work() as uow:
            assert len(select_candidates(uow.session, relaxed, limit=None)) == 1  # a changed floor tries again
    finally:
        archive.close()


def test_learned_codecs_make_lossy_derivatives_and_the_gan_promises_no_bound(sqlite_archive: Archive,
                                                                              tmp_path: Path) -> None:
    """``learned`` at N = 2 keeps its bound; the GAN gets the series' modality and is refused where a bound is
    promised (its reconstruction may differ by a unit on another machine)."""
    archive = sqlite_archive
    copies = _ingest(archive, tmp_path / "in", sorted(CT.glob("*.dcm"))[:1])
    (uid, instance_id), = _ids(archive).items()
    original = _pixels(copies[uid])

    bounded_gan = RecompressPolicy(name="gan-bounded", codec={"id": "gan", "bpp": 0.1}, max_error=4)
    with pytest.raises(ConfigError, match="cannot promise a per-pixel bound"):
        recompress_instance(archive, instance_id, bounded_gan)
    assert policy_codec(RecompressPolicy(name="g", codec={"id": "gan", "bpp": 0.1}), "CT").get_config()[
        "modality"] == "CT"
    assert policy_codec(RecompressPolicy(name="g", codec={"id": "gan", "bpp": 0.1}), "XA").get_config()[
        "modality"] == "OT"

    for name, config in (("learned-n2", {"id": "learned", "max_error": 2}), ("gan", {"id": "gan", "bpp": 0.25})):
        result = derive_lossy(archive, instance_id, RecompressPolicy(name=name, codec=config))
        assert result.outcome is ItemOutcome.RECOMPRESSED, result.reason
        with archive.unit_of_work() as uow:
            derived = uow.session.scalars(select(Instance).where(
                Instance.sop_instance_uid == result.derived_sop_instance_uid)).one()
            encoding = uow.session.scalars(select(Encoding).where(Encoding.instance_id == derived.id)).one()
            assert encoding.codec_id == config["id"] and encoding.encode_ms > 0 and encoding.decode_ms > 0
            assert encoding.max_error_bound == (2 if name == "learned-n2" else None)
            derived_uid, measured, psnr, bpp = (derived.sop_instance_uid, encoding.max_abs_error, encoding.psnr,
                                                encoding.bits_per_pixel)
            modality = encoding.codec_config.get("modality")
        frame = read_frame(archive, derived_uid, 0)
        error = np.abs(frame.astype(np.int64) - original.astype(np.int64))
        assert error.max() == measured
        if name == "learned-n2":
            assert error.max() <= 2
        else:
            assert modality == "CT" and bpp <= 0.26  # the target, plus the frame container's header
            assert psnr is not None and psnr > 50
