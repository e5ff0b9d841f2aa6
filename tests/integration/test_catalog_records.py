"""What the catalog records per encoding, and frame-by-frame access, on real multi-frame and CT files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from archive.catalog.models import Encoding, Instance
from archive.kinds import StorageMode
from archive.services.ingest import Outcome, ingest_paths
from archive.services.retrieve import read_frame
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import read, stored_values


@pytest.fixture
def misc_copy(tmp_path: Path) -> Path:
    target = tmp_path / "misc"
    shutil.copytree(shared_data() / "misc-barre", target)
    return target


@pytest.mark.parametrize("codec", [{"id": "jpegls"}, {"id": "jpegxl", "effort": 3}, {"id": "zstd", "level": 3}])
def test_encoding_rows_describe_what_was_done(archive: Archive, misc_copy: Path, codec: dict[str, object]) -> None:
    report = ingest_paths(archive, [misc_copy], codec_config=codec)
    assert report.count(Outcome.QUARANTINED) == 0
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(select(Instance, Encoding).join(Encoding, Encoding.instance_id == Instance.id)).all()
        originals = [row for row in rows if row[0].derived_from_id is None]
        assert len(originals) == report.instances == 10
        # the normalized copies (the shipped CT profile) are described the same way, in the ingest's codec
        assert len(rows) - len(originals) == sum(n.instances for n in report.normalized if n.outcome.value == "normalized")
        for instance, encoding in rows:
            assert encoding.is_current and encoding.generation == 1
            assert encoding.bytes_after > 0 and encoding.bytes_before > 0
            assert encoding.ratio == pytest.approx(encoding.bytes_before / encoding.bytes_after)
            if instance.storage_mode is StorageMode.PIXELS:
                if encoding.codec_id == "dicom-fragment":  # lossless input smaller as it arrived: its fragments kept
                    assert encoding.kind == "passthrough"
                    assert "original fragments kept" in (instance.storage_reason or "")
                    continue
                assert encoding.codec_id == codec["id"]
                assert encoding.codec_config == codec
                assert encoding.kind == "lossless"
                assert encoding.mse == 0 and encoding.max_abs_error == 0 and encoding.psnr is None
                assert sum(encoding.actual_codecs.values()) == instance.number_of_frames == len(encoding.frames)
                assert "imagecodecs" in encoding.library_versions
                pixels = (instance.rows or 0) * (instance.columns or 0) * (instance.number_of_frames or 0)
                assert encoding.bits_per_pixel == pytest.approx(encoding.bytes_after * 8 / pixels)
                assert encoding.side_info["bits_stored"] == instance.bits_stored
        modes = {Path(i.source_path or "").name: i.storage_mode for i, _ in originals}
    assert modes["rtstruct.dcm"] is StorageMode.WHOLE
    assert modes["CT_JPEG70.dcm"] is StorageMode.PIXELS  # JPEG lossless: decoded, re-encoded


def test_one_frame_reads_alone(archive: Archive, misc_copy: Path) -> None:
    ingest_paths(archive, [misc_copy])
    source = read(misc_copy / "MR_UnspecifiedLength.dcm")  # 27-frame segmentation
    expected = stored_values(source)
    assert expected.shape[0] == 27
    for index in (0, 13, 26):
        frame = read_frame(archive, str(source.SOPInstanceUID), index)
        assert frame.dtype == expected.dtype and np.array_equal(frame, expected[index])
