"""Header dictionaries trained during ingest: smaller headers, the same elements back, followed by verify and GC."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from archive.catalog.models import Blob, EncodedFrame, HeaderDictionary, Instance
from archive.codecs import get_codec
from archive.services.header_dictionaries import MIN_SAMPLES, SampleCollector
from archive.services.ingest import Outcome, ingest_paths
from archive.services.integrity import collect_garbage, verify_blobs
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from archive.services.staging import StagedInstance, stage_file
from tests.conftest import shared_data
from tests.dicom_compare import header_differences, read, stored_values

PHILIPS = "mr-philips-achieva/1301_Dual-echo_iso"
COUNT = MIN_SAMPLES + 8


def _philips(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(1, count + 1):
        paths.append(folder / f"{n:03d}.dcm")
        shutil.copyfile(shared_data() / PHILIPS / paths[-1].name, paths[-1])
    return paths


def _referenced(archive: Archive) -> set[str]:
    with archive.unit_of_work() as uow:
        return (set(uow.session.scalars(select(EncodedFrame.blob_sha256)))
                | set(uow.session.scalars(select(Instance.header_blob)))
                | {d for d in uow.session.scalars(select(Instance.header_dictionary)) if d is not None}
                | set(uow.session.scalars(select(HeaderDictionary.blob_sha256))))


def test_dictionary_trained_during_ingest(archive: Archive, tmp_path: Path) -> None:
    paths = _philips(tmp_path / "in", COUNT)
    report = ingest_paths(archive, [tmp_path / "in"], jobs=1)
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED] * COUNT

    with archive.unit_of_work() as uow:
        (dictionary,) = uow.session.scalars(select(HeaderDictionary)).all()
        assert dictionary.key == "MR|Philips"
        assert dictionary.samples == MIN_SAMPLES
        assert 0 < dictionary.bytes_with < dictionary.bytes_plain
        digest = dictionary.blob_sha256
        assert uow.session.get(Blob, digest) is not None
        rows = uow.session.execute(
            select(Instance.source_path, Instance.header_dictionary, Blob.size, Instance.series_id)
            .join(Blob, Blob.sha256 == Instance.header_blob).order_by(Instance.instance_number)).all()
    assert [Path(r.source_path) for r in rows] == paths
    assert len({r.series_id for r in rows}) == 1
    # the headers read before it was trained are plain; every one after names it
    assert [r.header_dictionary for r in rows] == [None] * MIN_SAMPLES + [digest] * (COUNT - MIN_SAMPLES)
    plain = [r.size for r in rows[:MIN_SAMPLES]]
    with_dictionary = [r.size for r in rows[MIN_SAMPLES:]]
    assert max(with_dictionary) * 2 < min(plain), (plain, with_dictionary)

    referenced = _referenced(archive)
    assert digest in referenced
    checked: list[str] = []
    verified = verify_blobs(archive, on_blob=lambda d, ok: checked.append(d))
    assert verified.problems == []
    assert digest in checked
    assert verified.blobs_checked == len(referenced) == len(set(checked))

    gc = collect_garbage(archive, grace_seconds=0)
    assert gc.blob_rows == 0, "a clean ingest leaves nothing unreferenced"
    with archive.unit_of_work() as uow:
        assert uow.session.get(Blob, digest) is not None, "the dictionary is referenced"
        assert referenced <= set(uow.session.scalars(select(Blob.sha256)))
    assert verify_blobs(archive).problems == []

    (study,) = report.studies
    files = retrieve_study(archive, study, tmp_path / "out").files
    assert len(files) == COUNT
    for item in files:
        assert item.source_path is not None
        source, back = read(Path(item.source_path)), read(item.path)
        assert not header_differences(source, back), item.source_path
        assert np.array_equal(stored_values(back), stored_values(source))


def _stage(archive: Archive, paths: list[Path]) -> list[StagedInstance]:
    codec = get_codec({"id": "jpegls"})
    staged = [stage_file(archive, path, codec) for path in paths]
    assert all(isinstance(item, StagedInstance) for item in staged), staged
    return [item for item in staged if isinstance(item, StagedInstance)]


def _dictionaries(archive: Archive) -> list[str]:
    with archive.unit_of_work() as uow:
        return list(uow.session.scalars(select(HeaderDictionary.key)))


@pytest.mark.parametrize("count", [MIN_SAMPLES - 1, MIN_SAMPLES])
def test_collector_trains_only_with_enough_samples(sqlite_archive: Archive, tmp_path: Path, count: int) -> None:
    staged = _stage(sqlite_archive, _philips(tmp_path / "in", count))
    assert {item.header_key for item in staged} == {"MR|Philips"}
    collector = SampleCollector()
    collector.add(staged)
    trained = collector.train_ready(sqlite_archive)
    if count < MIN_SAMPLES:
        assert trained == [] and _dictionaries(sqlite_archive) == []
        assert len(collector.samples["MR|Philips"]) == count, "kept for when more arrive"
    else:
        assert [row.key for row in trained] == ["MR|Philips"]
        assert _dictionaries(sqlite_archive) == ["MR|Philips"]
        assert collector.train_ready(sqlite_archive) == [], "each kind is trained once"
