"""auto at ingest: one trial per series, recorded in the catalog, the whole series stored with the winner."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydicom import dcmread
from sqlalchemy import select

from archive.catalog.models import Encoding, Instance
from archive.services.codec_choice import trials_of
from archive.services.ingest import Outcome, ingest_paths
from archive.services.retrieve import read_frame
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import stored_values

AUTO = {"id": "auto", "candidates": [{"id": "jpegls"}, {"id": "zstd", "level": 3}, {"id": "jpegxl", "effort": 3}]}


def test_auto_chooses_once_per_series_and_stores_it_exactly(sqlite_archive: Archive, tmp_path: Path) -> None:
    sources = sorted((shared_data() / "mr-philips-achieva").rglob("*.dcm"))[:12]
    inbox = tmp_path / "in"
    inbox.mkdir()
    for source in sources:
        shutil.copyfile(source, inbox / source.name)
    report = ingest_paths(sqlite_archive, [inbox], codec_config=AUTO)
    assert all(o.outcome is Outcome.STORED for o in report.outcomes)
    series_uids = {str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in sources}
    for series_uid in series_uids:
        trials = trials_of(sqlite_archive, series_uid)
        assert len(trials) == 1, trials  # one trial per series
        trial = trials[0]
        assert 1 <= trial["sampled"] and trial["winner"]["id"] in {"jpegls", "zstd", "jpegxl"}
        sizes = {c["config"]["id"]: c["projected_bytes"] for c in trial["result"]["candidates"] if c["ok"]}
        assert sizes[trial["winner"]["id"]] == min(sizes.values())
    with sqlite_archive.unit_of_work() as uow:
        rows = uow.session.execute(select(Instance.sop_instance_uid, Encoding.codec_config, Instance.series_id)
                                   .join(Encoding, Encoding.instance_id == Instance.id)).all()
    by_series: dict[int, set[str]] = {}
    for _, config, series_id in rows:
        by_series.setdefault(series_id, set()).add(config["id"])
    assert all(len(ids) == 1 for ids in by_series.values())  # one codec for the whole series
    for source in sources[:3]:
        ds = dcmread(source)
        assert np.array_equal(read_frame(sqlite_archive, str(ds.SOPInstanceUID), 0), np.asarray(stored_values(ds)))
