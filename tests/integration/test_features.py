"""``medarchive features`` on real MR: PCA per series, read back from the archive, checked against the files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

import archive.cli.features  # noqa: F401  (registers the command, as archive/cli/__init__.py does)
from archive.cli import app, describe_failure
from archive.errors import NotFoundError
from archive.services.features import extract_features
from archive.services.ingest import ingest_paths
from archive.services.runtime import Archive
from tests.conftest import shared_data

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def philips(tmp_path: Path) -> Path:
    """Every third file of the Philips dual-echo series: magnitude and phase maps, scaled differently (40 files)."""
    source = shared_data() / "mr-philips-achieva" / "1301_Dual-echo_iso"
    folder = tmp_path / "philips"
    folder.mkdir()
    for path in sorted(source.glob("*.dcm"))[::3]:
        shutil.copyfile(path, folder / path.name)
    return folder


def _study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def _modality_values(folder: Path) -> dict[str, np.ndarray]:
    """The source files' pixels in modality units, by SOP Instance UID (what the features must be fitted on)."""
    values = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        values[str(ds.SOPInstanceUID)] = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return values


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and imread(path).ndim == 3  # a valid PNG matplotlib decodes


def test_features_of_a_real_mr_series_reconstruct_its_modality_values(sqlite_archive: Archive, philips: Path, tmp_path: Path) -> None:
    ingest_paths(sqlite_archive, [philips])
    study = _study_uid(philips)
    result = extract_features(sqlite_archive, study, tmp_path / "out")
    (series,) = result.series
    assert series.fitted, series.reason
    assert (series.instances, series.samples, series.shape, series.units) == (40, 40, (96, 96), "modality")
    assert series.components_95 is not None and series.components_98 is not None
    assert 1 <= series.components_95 <= series.components_98 <= series.components <= series.fitted_components
    assert series.variance_kept is not None and series.variance_kept >= 0.999
    npz, cumulative_png, components_png = series.files
    assert npz.parent.parent == tmp_path / "out" and all(_is_png(p) for p in (cumulative_png, components_png))

    with np.load(npz) as saved:
        cumulative, ratio = saved["cumulative"], saved["explained_variance_ratio"]
        assert np.all(np.diff(cumulative) >= 0) and cumulative[-1] <= 1.0 and cumulative[-1] > 0.999
        assert np.allclose(cumulative, np.cumsum(ratio), atol=1e-12)
        assert list(saved["components_needed"]) == [series.components_95, series.components_98]
        assert cumulative[series.components_95 - 1] >= 0.95 > (cumulative[series.components_95 - 2]
                                                               if series.components_95 > 1 else 0)
        components = saved["components"]
        assert components.shape == (series.components, 96, 96) and saved["mean"].shape == (96, 96)
        flat = components.reshape(len(components), -1)
        assert np.allclose(flat @ flat.T, np.eye(len(flat)), atol=1e-9)  # orthonormal
        assert saved["scores"].shape == (40, series.components)
        assert len(set(saved["sop_instance_uids"])) == 40 and set(saved["frame_numbers"]) == {1}

    # with all the components, the scores give the samples back: the pixels the archive holds, in modality units
    (series,) = extract_features(sqlite_archive, study, tmp_path / "all", components=40, images=0).series
    assert series.components == 40 and series.fitted_components == 40
    with np.load(series.files[0]) as saved:
        flat = saved["components"].reshape(40, -1)
        rebuilt = saved["scores"] @ flat + saved["mean"].ravel()
        uids = [str(u) for u in saved["sop_instance_uids"]]
    expected = _modality_values(philips)
    samples = np.stack([expected[uid].ravel() for uid in uids])
    assert np.abs(rebuilt - samples).max() < 1e-6 * np.ptp(samples)  # phase maps scaled to -3142..3142, magnitudes not


def test_a_single_slice_series_is_listed_with_the_reason(sqlite_archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copyfile(shared_data() / "ct-chest-tcia" / "A048383" / "axial" / "19001231-30.dcm", folder / "ct.dcm")
    ingest_paths(sqlite_archive, [folder])
    (series,) = extract_features(sqlite_archive, _study_uid(folder), tmp_path / "out").series
    assert not series.fitted and "at least 2" in series.reason and series.files == ()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_features_command_prints_the_table_and_writes_the_files(sqlite_archive: Archive, philips: Path,
                                                                 tmp_path: Path) -> None:
    ingest_paths(sqlite_archive, [philips])
    study, out = _study_uid(philips), tmp_path / "cli-out"
    env = {"MEDARCHIVE_HOME": str(tmp_path / "home"), "MEDARCHIVE_NORMALIZE": "off", "COLUMNS": "200"}
    done = CliRunner().invoke(app, ["features", study, "--out", str(out), "--images", "2"], env=env)
    assert done.exit_code == 0, (done.output, done.exception)
    assert "PCA features of 1 of 1 series" in done.stdout and "95 %" in done.stdout and "98 %" in done.stdout
    assert "pca.npz" in done.stdout and "cumulative_variance.png" in done.stdout
    (folder,) = out.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["components.png", "cumulative_variance.png", "pca.npz"]

    as_json = CliRunner().invoke(app, ["features", study, "--out", str(out), "--json"], env=env)
    assert as_json.exit_code == 0, (as_json.output, as_json.exception)
    (series,) = json.loads(as_json.stdout)["series"]
    assert series["fitted"] and series["instances"] == 40 and series["components_95"] <= series["components_98"]
    row = rf"\bMR +40 +{series['components_95']} +{series['components_98']} +{series['components']} "
    assert re.search(row, done.stdout), done.stdout  # the table says what the JSON says


def test_unknown_study_is_a_clear_error(sqlite_archive: Archive, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no study with Study Instance UID '1.2.3.4'"):
        extract_features(sqlite_archive, "1.2.3.4", tmp_path / "out")
    env = {"MEDARCHIVE_HOME": str(tmp_path / "home"), "MEDARCHIVE_NORMALIZE": "off"}
    done = CliRunner().invoke(app, ["features", "1.2.3.4", "--out", str(tmp_path / "out")], env=env)
    assert isinstance(done.exception, NotFoundError)
    message, code = describe_failure(done.exception)  # what `medarchive` prints and exits with
    assert code == 2 and "1.2.3.4" in message and "medarchive studies" in message
    assert not (tmp_path / "out").exists()


def test_each_frame_of_a_multi_frame_instance_is_a_sample(sqlite_archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "multi"
    folder.mkdir()
    shutil.copyfile(shared_data() / "misc-barre" / "MR_Explicit_Little_MultiFrame.dcm", folder / "mf.dcm")
    ingest_paths(sqlite_archive, [folder])
    (series,) = extract_features(sqlite_archive, _study_uid(folder), tmp_path / "out", components=16, images=2).series
    assert series.fitted, series.reason
    # no Rescale Slope/Intercept in this header: the stored values are the samples, and the result says so
    assert (series.instances, series.samples, series.shape, series.units) == (1, 16, (256, 256), "stored")
    with np.load(series.files[0]) as saved:
        assert list(saved["frame_numbers"]) == list(range(1, 17)) and len(set(saved["sop_instance_uids"])) == 1
        rebuilt = saved["scores"] @ saved["components"].reshape(16, -1) + saved["mean"].ravel()
    frames = pydicom.dcmread(folder / "mf.dcm").pixel_array.reshape(16, -1).astype(np.float64)
    assert np.abs(rebuilt - frames).max() < 1e-6 * np.ptp(frames)
