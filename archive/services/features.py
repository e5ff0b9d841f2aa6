"""Use case: PCA features of a study's series (``medarchive features``), the mission's other use of PCA.

Each original series is one PCA problem: its frames are the samples (every
frame of a multi-frame instance is one), their pixels the variables. What is
written per series lets a researcher use the features without the archive:
``pca.npz`` (components as images, explained variance, mean image, scores per
frame, which instance and frame each score row is), a plot of the cumulative
explained variance with the 95 % and 98 % marks, and the mean image with the
first components. The pixels are read as the archive holds them (through the
unit of work, checked on read, decoded like normalization decodes them) and
converted to modality units where the header gives Rescale Slope/Intercept, so
that a series mixing differently scaled images (Philips magnitude and phase
maps) is compared in one unit.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select

from archive.catalog.models import Series, Study
from archive.dicom.uids import safe_component
from archive.errors import ArchiveError, BlobCorruptError, BlobNotFoundError, CodecError, NotFoundError
from archive.kinds import Variant
from archive.services.normalization import decode_images, image_instances, load_headers
from archive.services.retrieve import variant_filter
from archive.services.runtime import Archive

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MARKS = (0.95, 0.98)  # the shares of explained variance the plot and the table report
FULL_SVD_WORK = 4e10  # samples x pixels x min(samples, pixels) above which the randomized solver is used
RANDOMIZED_COMPONENTS = 200  # components the randomized solver fits when no number is asked for


@dataclass(frozen=True)
class SeriesFeatures:
    """One series' PCA: what was fitted and written, or why nothing was."""

    series_uid: str
    modality: str | None
    instances: int  # instances whose pixels were read
    samples: int = 0  # frames (one per single-frame instance)
    shape: tuple[int, ...] = ()  # of one frame: (rows, columns[, samples per pixel])
    units: str = ""  # "modality" (Rescale Slope/Intercept applied) or "stored" (no rescale in the headers)
    solver: str = ""
    fitted_components: int = 0  # explained variance is known for this many
    components: int = 0  # kept in pca.npz (components, scores)
    variance_kept: float | None = None  # share of the variance the kept components explain
    components_95: int | None = None  # components needed for 95 % (None: not reached by the fitted ones)
    components_98: int | None = None
    files: tuple[Path, ...] = ()
    reason: str = ""  # why the series was not fitted

    @property
    def fitted(self) -> bool:
        return not self.reason

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape), "files": [str(p) for p in self.files],
                "fitted": self.fitted}


@dataclass(frozen=True)
class FeaturesResult:
    study_uid: str
    out_dir: Path
    series: tuple[SeriesFeatures, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "out_dir": str(self.out_dir),
                "series": [s.as_dict() for s in self.series]}


@dataclass(frozen=True)
class _Samples:
    """A series' frames as a PCA design matrix, one flattened frame per row."""

    matrix: np.ndarray  # (samples, pixels) float64
    shape: tuple[int, ...]
    sop_instance_uids: list[str]
    frame_numbers: list[int]  # 1-based, within each instance
    instances: int
    rescaled: bool


def extract_features(archive: Archive, study_uid: str, out_dir: Path, *, series_uid: str | None = None,
                     components: int | None = None, variance: float = 0.999, images: int = 4) -> FeaturesResult:
    """Fit PCA on every original series of a study (or the one ``series_uid`` names) and write its files.

    ``components`` keeps that many components in ``pca.npz``; without it, as
    many as explain ``variance`` of the variance. The explained variance of
    every fitted component is written either way (it draws the plot).
    ``images`` components are drawn next to the mean image.
    """
    if not 0.0 < variance <= 1.0:
        raise ArchiveError(f"variance must be a share in (0, 1], not {variance}")
    if components is not None and components < 1:
        raise ArchiveError(f"components must be at least 1, not {components}")
    if images < 0:
        raise ArchiveError(f"images must be 0 or more, not {images}")
    with archive.unit_of_work() as uow:
        study_id = uow.session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if study_id is None:
            raise NotFoundError(f"no study with Study Instance UID {study_uid!r} (see `medarchive studies`)")
        query = select(Series.id, Series.series_uid, Series.modality).where(Series.study_id == study_id)
        # a series named explicitly is taken whatever it is; otherwise the originals (not derived copies)
        query = query.where(Series.series_uid == series_uid) if series_uid else query.where(
            variant_filter(Variant.ORIGINAL))
        found = [(sid, uid, modality) for sid, uid, modality in uow.session.execute(
            query.order_by(Series.series_number, Series.id))]
    if series_uid and not found:
        raise NotFoundError(f"study {study_uid} has no series {series_uid!r} (see `medarchive show {study_uid}`)")
    out_dir = Path(out_dir)
    results = [_series_features(archive, sid, uid, modality, out_dir, components, variance, images)
               for sid, uid, modality in found]
    return FeaturesResult(study_uid, out_dir, tuple(results))


def _series_features(archive: Archive, series_id: int, series_uid: str, modality: str | None, out_dir: Path,
                     components: int | None, variance: float, images: int) -> SeriesFeatures:
    """One series read, fitted and written; a series that cannot be fitted says why instead."""
    try:
        samples = _read_samples(archive, series_id)
    except (BlobNotFoundError, BlobCorruptError, CodecError) as exc:
        return SeriesFeatures(series_uid, modality, 0, reason=f"pixels cannot be read: {exc}")
    if isinstance(samples, tuple):
        instances, reason = samples
        return SeriesFeatures(series_uid, modality, instances, reason=reason)
    base = SeriesFeatures(series_uid, modality, samples.instances, samples=len(samples.matrix), shape=samples.shape,
                          units="modality" if samples.rescaled else "stored")
    try:
        fit = _fit(samples.matrix, components, variance)
    except (ValueError, np.linalg.LinAlgError) as exc:
        return replace(base, reason=f"PCA failed: {exc}")
    folder = out_dir / safe_component(series_uid)
    folder.mkdir(parents=True, exist_ok=True)
    files = (folder / "pca.npz", folder / "cumulative_variance.png", folder / "components.png")
    _write_npz(files[0], samples, fit, base.units)
    _plot_cumulative(files[1], fit.cumulative, series_uid)
    _plot_components(files[2], fit, samples.shape, images)
    return replace(base, solver=fit.solver, fitted_components=len(fit.ratio), components=fit.kept,
                    variance_kept=float(fit.cumulative[fit.kept - 1]), components_95=fit.needed[0],
                    components_98=fit.needed[1], files=files)


def _read_samples(archive: Archive, series_id: int) -> _Samples | tuple[int, str]:
    """The series' frames as samples, or (instances read, why they are no PCA problem)."""
    with archive.unit_of_work() as uow:
        instances = image_instances(uow, series_id)
        if not instances:
            return 0, "no image instances (nothing with pixels)"
        images = decode_images(uow, instances, load_headers(uow, instances))
    if not images:
        return 0, "no decodable image instances"
    shapes: Counter[tuple[int, ...]] = Counter()
    rows: list[np.ndarray] = []
    uids: list[str] = []
    numbers: list[int] = []
    rescaled = False
    for image in images:
        for index, frame in enumerate(image.frames):
            shapes[tuple(frame.shape)] += 1
            values = np.asarray(frame, dtype=np.float64)
            scale = _rescale(image.dataset, index)
            if scale is not None:
                rescaled = True
                values = values * scale[0] + scale[1]
            rows.append(values.ravel())
            uids.append(image.sop_instance_uid)
            numbers.append(index + 1)
    if len(shapes) > 1:
        listed = ", ".join(f"{'x'.join(map(str, s))} ({n})" for s, n in shapes.most_common())
        return len(images), f"frames of mixed shapes: {listed}"
    if len(rows) < 2:
        return len(images), "one frame only: PCA needs at least 2 samples"
    matrix = np.stack(rows)
    if not np.isfinite(matrix).all():
        return len(images), "pixel values are not finite"
    if not np.ptp(matrix, axis=0).any():
        return len(images), "every frame is the same: no variance to explain"
    (shape,) = shapes
    return _Samples(matrix, shape, uids, numbers, len(images), rescaled)


def _rescale(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """Rescale Slope and Intercept of one frame: the image's, else the enhanced multi-frame functional groups'."""
    candidates: list[Dataset] = [ds]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        candidates += list(per_frame[frame].get("PixelValueTransformationSequence") or [])
    for shared in ds.get("SharedFunctionalGroupsSequence") or []:
        candidates += list(shared.get("PixelValueTransformationSequence") or [])
    for item in candidates:
        slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
        if slope not in (None, "") or intercept not in (None, ""):
            return (float(slope) if slope not in (None, "") else 1.0,
                    float(intercept) if intercept not in (None, "") else 0.0)
    return None


@dataclass(frozen=True)
class _Fit:
    solver: str
    components: np.ndarray  # (fitted, pixels), orthonormal rows
    mean: np.ndarray  # (pixels,)
    variance: np.ndarray  # explained variance per fitted component
    ratio: np.ndarray  # explained variance ratio per fitted component
    cumulative: np.ndarray
    scores: np.ndarray  # (samples, kept)
    kept: int
    needed: tuple[int | None, ...]  # components needed for each of MARKS


def _fit(matrix: np.ndarray, components: int | None, variance: float) -> _Fit:
    """scikit-learn's PCA: every component by a full SVD while that is cheap, else a seeded randomized SVD."""
    from sklearn.decomposition import PCA  # heavy: imported only when a series is fitted

    n, d = matrix.shape
    rank = min(n, d)
    if n * d * rank <= FULL_SVD_WORK:
        pca = PCA(svd_solver="full")
        solver = "full"
    else:
        wanted = min(rank, max(components or 0, RANDOMIZED_COMPONENTS))
        pca = PCA(n_components=wanted, svd_solver="randomized", random_state=0)
        solver = "randomized"
    pca.fit(matrix)
    ratio = np.asarray(pca.explained_variance_ratio_, dtype=np.float64)
    cumulative = np.minimum(np.cumsum(ratio), 1.0)  # a share: rounding must not take it past 1
    kept = min(components, len(ratio)) if components is not None else _needed(cumulative, variance) or len(ratio)
    basis = np.asarray(pca.components_, dtype=np.float64)
    mean = np.asarray(pca.mean_, dtype=np.float64)
    scores = (matrix - mean) @ basis[:kept].T
    return _Fit(solver, basis, mean, np.asarray(pca.explained_variance_, dtype=np.float64), ratio, cumulative,
                scores, kept, tuple(_needed(cumulative, mark) for mark in MARKS))


def _needed(cumulative: np.ndarray, share: float) -> int | None:
    """The fewest components explaining ``share`` of the variance (None when the fitted ones do not)."""
    index = int(np.searchsorted(cumulative, share - 1e-12, side="left"))
    return index + 1 if index < len(cumulative) else None


def _write_npz(path: Path, samples: _Samples, fit: _Fit, units: str) -> None:
    np.savez_compressed(
        path,
        components=fit.components[:fit.kept].reshape(fit.kept, *samples.shape),
        explained_variance=fit.variance,
        explained_variance_ratio=fit.ratio,
        cumulative=fit.cumulative,
        mean=fit.mean.reshape(samples.shape),
        scores=fit.scores,
        sop_instance_uids=np.array(samples.sop_instance_uids, dtype=str),
        frame_numbers=np.array(samples.frame_numbers, dtype=np.int64),
        marks=np.array(MARKS),
        components_needed=np.array([-1 if k is None else k for k in fit.needed], dtype=np.int64),
        units=np.array(units),
        solver=np.array(fit.solver),
    )


def _plot_cumulative(path: Path, cumulative: np.ndarray, series_uid: str) -> None:
    """Cumulative explained variance against components, the 95 % and 98 % marks and what reaches them."""
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas draws PNG

    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    counts = np.arange(1, len(cumulative) + 1)
    axes.plot(counts, cumulative, marker="." if len(counts) <= 60 else None, color="tab:blue",
              label="cumulative explained variance")
    for mark, colour in zip(MARKS, ("tab:orange", "tab:red")):
        needed = _needed(cumulative, mark)
        said = f"{needed} component{'s' if needed != 1 else ''}" if needed else f"not reached by {len(cumulative)}"
        axes.axhline(mark, color=colour, linestyle="--", linewidth=1, label=f"{mark:.0%}: {said}")
        if needed is not None:
            axes.axvline(needed, color=colour, linestyle=":", linewidth=1)
            axes.text(needed, 0.03, f" {needed}", color=colour, transform=axes.get_xaxis_transform())
    axes.set_xlabel("components")
    axes.set_ylabel("share of variance explained")
    axes.set_ylim(min(0.0, float(cumulative[0])), 1.02)
    axes.set_xlim(0.5, len(cumulative) + 0.5)
    axes.set_title(f"PCA of series {series_uid}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, format="png")


def _plot_components(path: Path, fit: _Fit, shape: tuple[int, ...], images: int) -> None:
    """The mean image and the first components (diverging colours: a component's sign is arbitrary)."""
    from matplotlib.figure import Figure

    shown = min(images, len(fit.components))
    panels = 1 + shown
    columns = min(panels, 5)
    lines = math.ceil(panels / columns)
    figure = Figure(figsize=(2.6 * columns, 2.8 * lines), dpi=100)
    grid = figure.subplots(lines, columns, squeeze=False)
    axes_list: list[Axes] = [a for line in grid for a in line]
    _show(axes_list[0], fit.mean.reshape(shape), "mean", signed=False)
    for number in range(shown):
        _show(axes_list[1 + number], fit.components[number].reshape(shape),
              f"PC{number + 1} ({fit.ratio[number]:.1%})", signed=True)
    for unused in axes_list[panels:]:
        unused.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, format="png")


def _show(axes: Axes, image: np.ndarray, title: str, *, signed: bool) -> None:
    if image.ndim == 3:  # colour: each channel scaled to [0, 1] together, shown as RGB
        low, high = float(image.min()), float(image.max())
        axes.imshow((image - low) / (high - low) if high > low else np.zeros_like(image))
    elif signed:
        bound = float(np.abs(image).max()) or 1.0
        axes.imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound)
    else:
        axes.imshow(image, cmap="gray")
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()
