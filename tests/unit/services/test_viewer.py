"""The viewer's panes for a lossy derivative whose lossless original a policy released: said, not broken."""

from __future__ import annotations

import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from archive.catalog.models import Derivation, Instance, Series
from archive.config import RecompressPolicy
from archive.errors import NotFoundError
from archive.kinds import DerivationKind
from archive.services.ingest import ingest_paths
from archive.services.recompress import recompress_instance
from archive.services.runtime import Archive
from archive.services.viewer import Pane, ViewKind, render_pane, series_view
from tests.conftest import shared_data


def test_a_released_original_is_named_and_its_panes_say_so(sqlite_archive: Archive, tmp_path: Path) -> None:
    archive = sqlite_archive
    source = sorted((shared_data() / "ct-chest-tcia" / "A002304" / "axial").glob("*.dcm"))[0]
    (tmp_path / "in").mkdir()
    shutil.copyfile(source, tmp_path / "in" / source.name)
    ingest_paths(archive, [tmp_path / "in"])
    study_uid = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    with archive.unit_of_work() as uow:
        instance_id = uow.session.scalar(select(Instance.id))
    assert instance_id is not None
    policy = RecompressPolicy(name="near2-release", codec={"id": "jpegls", "near": 2}, keep_lossless=False)
    recompress_instance(archive, instance_id, policy)
    with archive.unit_of_work() as uow:
        series_uid, sop = uow.session.execute(
            select(Series.series_uid, Instance.sop_instance_uid).join(Instance)
            .join(Derivation, Derivation.series_id == Series.id).where(Derivation.kind == DerivationKind.LOSSY)).one()

    view = series_view(archive, study_uid, series_uid)
    assert view.kind is ViewKind.LOSSY_RELEASED and "released" in view.notes[0]
    with pytest.raises(NotFoundError, match="released"):
        render_pane(archive, sop, 0, Pane.ORIGINAL)
    reconstruction = imagecodecs.png_decode(render_pane(archive, sop, 0, Pane.RECONSTRUCTION))
    assert reconstruction.shape == (512, 512) and reconstruction.std() > 0
    difference = imagecodecs.png_decode(render_pane(archive, sop, 0, Pane.DIFFERENCE))
    assert np.all(difference == 128)  # nothing to subtract: flat, and the page says why
