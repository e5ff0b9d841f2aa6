"""What the web page's slice viewer shows: three panes per slice and the series' rate-distortion figures.

Plain functions over the archive (no HTTP). A viewed series is one of:

- a LOSSY derived series: *original* is its source instance, *reconstruction*
  the derived instance, *difference* reconstruction - original, scaled so that
  the series' largest recorded error reaches black/white;
- a NORMALIZED derived series: *original* is the source slice resampled onto
  the derived grid with the recorded in-plane maps and kernel (the normalize
  pipeline's own :func:`resample_plane`); where the derivation resampled across
  slices or planned planes differently, the nearest source slice unresampled,
  and no pixel difference (different grids);
- an original series stored lossless: original = reconstruction (the archived
  values), the difference flat;
- an original series stored with a lossy codec: the original is not kept; the
  reconstruction and the recorded error are shown.

Differences are taken on stored values (before Rescale Slope/Intercept), the
units the codecs' error bounds are expressed in.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from archive.catalog.models import CodecTrial, Derivation, Encoding, Instance, InstanceStatus, Series, Study
from archive.dicom.writer import read_header
from archive.errors import NotFoundError
from archive.kinds import DerivationKind, StorageMode
from archive.normalize.grid import AxisMap, Interpolation
from archive.normalize.resample import resample_plane
from archive.services.rendering import PNG, Window, difference_display, encode_image, fit_viewport, header_window, \
    render_frame
from archive.services.retrieve import current_encoding, read_frame
from archive.services.runtime import Archive
from archive.services.unit_of_work import UnitOfWork

VIEWPORT = 1024  # largest side of a pane image; larger images are area-averaged down


class Pane(str, enum.Enum):
    ORIGINAL = "original"
    RECONSTRUCTION = "reconstruction"
    DIFFERENCE = "difference"


class ViewKind(str, enum.Enum):
    """What the three panes of a series mean (see the module docstring)."""

    LOSSLESS = "lossless"
    LOSSY_STORED = "lossy-stored"
    LOSSY_DERIVED = "lossy-derived"
    LOSSY_RELEASED = "lossy-released"  # a lossy derivative whose lossless source a policy released
    NORMALIZED = "normalized"  # source resampled onto the derived grid
    NORMALIZED_NEAREST = "normalized-nearest"  # different grids: nearest source slice, no difference
    NO_PIXELS = "no-pixels"  # kept whole or passed through: nothing to render frame by frame


PANE_NOTES: dict[ViewKind, tuple[str, str, str]] = {
    ViewKind.LOSSLESS: ("archived values", "the same values (lossless)", "lossless: identical"),
    ViewKind.LOSSY_STORED: ("the original is not kept (stored with a lossy codec)", "decoded from the lossy encoding",
                            "no original to subtract: see the recorded error below"),
    ViewKind.LOSSY_DERIVED: ("the source instance (lossless)", "the lossy derivative, decoded",
                             "reconstruction - original"),
    ViewKind.LOSSY_RELEASED: ("the original was released by a policy: only this lossy derivative is held",
                              "the lossy derivative, decoded", "no original to subtract: see the recorded error below"),
    ViewKind.NORMALIZED: ("the source slice resampled onto the normalized grid (recorded maps and kernel)",
                          "the normalized instance as stored", "normalized - resampled source"),
    ViewKind.NORMALIZED_NEAREST: ("the nearest source slice, on its own grid", "the normalized instance as stored",
                                  "different grid: no pixel difference"),
    ViewKind.NO_PIXELS: ("", "", "no frames stored: nothing to render"),
}


@dataclass(frozen=True)
class Slice:
    sop_instance_uid: str
    frame: int
    label: str


@dataclass(frozen=True)
class Figure:
    """One instance's current encoding: what it cost and what it lost."""

    instance_number: int | None
    sop_instance_uid: str
    codec: str
    config: dict[str, Any]
    bytes_before: int
    bytes_after: int
    ratio: float
    bits_per_pixel: float
    psnr: float | None  # peak 2**BitsStored - 1; None when exact
    max_abs_error: float | None
    bound: int | None


@dataclass
class SeriesView:
    """Everything the viewer page shows about one series."""

    study_uid: str
    series_uid: str
    modality: str | None
    description: str | None
    kind: ViewKind
    slices: list[Slice]
    windows: list[tuple[str, Window]]  # presets: the header's, then the modality's usual ones
    difference_scale: float | None  # stored values that reach black/white in the difference pane; None: per image
    figures: list[Figure]
    source_series_uid: str | None = None
    source_figures: list[Figure] = field(default_factory=list)
    derivation: dict[str, Any] | None = None  # kind, profile, rmse, max_abs_error of a derived series
    trials: list[dict[str, Any]] = field(default_factory=list)  # the auto codec's candidates: codec, bytes, bpp

    @property
    def notes(self) -> tuple[str, str, str]:
        return PANE_NOTES[self.kind]


MODALITY_WINDOWS: dict[str, list[tuple[str, Window]]] = {
    "CT": [("soft tissue", Window(40, 400)), ("lung", Window(-600, 1500)), ("bone", Window(400, 1800)),
           ("brain", Window(40, 80))],
}


def series_view(archive: Archive, study_uid: str, series_uid: str) -> SeriesView:
    """The viewer's data for one series of a study (NotFoundError when the series is not that study's)."""
    with archive.unit_of_work() as uow:
        series = _series(uow, study_uid, series_uid)
        derivation = uow.session.scalar(select(Derivation).where(Derivation.series_id == series.id))
        instances = [i for i in series.instances if i.conflict_seq == 0]
        kind = _kind(derivation, instances, _released(uow, instances))
        slices = [Slice(i.sop_instance_uid, f, _label(i, f)) for i in instances
                  if i.storage_mode is StorageMode.PIXELS for f in range(i.number_of_frames or 1)]
        windows: list[tuple[str, Window]] = []
        if instances:
            windows = _header_windows(_header(uow, instances[0]))
        windows += MODALITY_WINDOWS.get((series.modality or "").upper(), [])
        figures = [_figure(i) for i in instances if _has_current(i)]
        view = SeriesView(study_uid=study_uid, series_uid=series.series_uid, modality=series.modality,
                          description=series.series_description, kind=kind, slices=slices, windows=windows,
                          difference_scale=_difference_scale(figures) if kind is ViewKind.LOSSY_DERIVED else None,
                          figures=figures)
        if derivation is not None:
            source = uow.session.scalar(select(Series).where(Series.id == derivation.source_series_id)
                                        .options(selectinload(Series.instances).selectinload(Instance.encodings)))
            if source is not None:
                view.source_series_uid = source.series_uid
                view.source_figures = [_figure(i) for i in source.instances
                                       if i.conflict_seq == 0 and _has_current(i)]
            view.derivation = {"kind": derivation.kind.value, "profile": derivation.profile,
                               "rmse": derivation.rmse, "max_abs_error": derivation.max_abs_error,
                               "interpolation": derivation.interpolation, "across_slices": derivation.across_slices}
        uids = [series.series_uid] + ([view.source_series_uid] if view.source_series_uid else [])
        view.trials = [_trial(t) for t in uow.session.scalars(
            select(CodecTrial).where(CodecTrial.series_uid.in_(uids)).order_by(CodecTrial.id))]
        return view


def render_pane(archive: Archive, sop_instance_uid: str, frame: int, pane: Pane, *,
                window: Window | None = None) -> bytes:
    """One pane of one slice of a viewed series' instance, as PNG bytes."""
    with archive.unit_of_work() as uow:
        instance = _instance(uow, sop_instance_uid)
        derivation = uow.session.scalar(select(Derivation).where(Derivation.series_id == instance.series_id))
        kind = _kind(derivation, [instance], _released(uow, [instance]))
        if kind is ViewKind.NO_PIXELS:
            raise NotFoundError(f"instance {sop_instance_uid} has no frames stored: nothing to render")
        header = _header(uow, instance)
        photometric = _photometric(instance)
        source = uow.session.get(Instance, instance.derived_from_id) if instance.derived_from_id else None
        source_header = _header(uow, source) if source is not None else header
        source_uid = source.sop_instance_uid if source is not None else None
        source_photometric = _photometric(source) if source is not None else photometric
        pad = int(header.get("PixelPaddingValue", 0) or 0) if isinstance(header.get("PixelPaddingValue"), int) else 0
        scale = None
        if kind is ViewKind.LOSSY_DERIVED:
            series = uow.session.scalar(select(Series).where(Series.id == instance.series_id)
                                        .options(selectinload(Series.instances).selectinload(Instance.encodings)))
            assert series is not None
            scale = _difference_scale([_figure(i) for i in series.instances if _has_current(i)])
        transform = derivation.transform if derivation is not None else {}
    if kind is ViewKind.LOSSY_STORED and pane is Pane.ORIGINAL:
        raise NotFoundError(f"instance {sop_instance_uid} is stored lossy: its original is not kept")
    if kind is ViewKind.LOSSY_RELEASED and pane is Pane.ORIGINAL:
        raise NotFoundError(f"instance {sop_instance_uid}: its lossless original was released by a policy")
    if pane is Pane.RECONSTRUCTION or (pane is Pane.ORIGINAL and kind is ViewKind.LOSSLESS):
        return _png(render_frame(read_frame(archive, sop_instance_uid, frame), header, window=window,
                                 photometric=photometric))
    if pane is Pane.ORIGINAL:
        assert source_uid is not None
        original = _source_frame(archive, source_uid, frame, kind, transform, pad, source_header)
        return _png(render_frame(original, source_header, window=window, photometric=source_photometric))
    reconstruction = read_frame(archive, sop_instance_uid, frame)
    if kind in (ViewKind.LOSSY_DERIVED, ViewKind.NORMALIZED):
        assert source_uid is not None
        original = _source_frame(archive, source_uid, frame, kind, transform, pad, source_header)
        return _png(difference_display(original, reconstruction, scale=scale))
    flat = reconstruction if reconstruction.ndim == 2 else reconstruction[..., 0]
    return _png(np.full(flat.shape, 128, dtype=np.uint8))


def _png(image: np.ndarray) -> bytes:
    return encode_image(fit_viewport(image, VIEWPORT, VIEWPORT), PNG)


def _source_frame(archive: Archive, source_uid: str, frame: int, kind: ViewKind, transform: dict[str, Any],
                  pad: int, source_header: Dataset) -> np.ndarray:
    """The source's frame as the original pane shows it: on the derived grid where the derivation allows."""
    pixels = read_frame(archive, source_uid, frame)
    if kind is not ViewKind.NORMALIZED:
        return pixels
    plane = transform["plane"]
    rows, columns = AxisMap(**plane["rows"]), AxisMap(**plane["columns"])
    bits = int(source_header.get("BitsStored", 0) or pixels.dtype.itemsize * 8)
    signed = int(source_header.get("PixelRepresentation", 0) or 0)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    pad = min(max(pad, low), high)
    return resample_plane(pixels, rows, columns, Interpolation(transform["kernel"]), pad_value=pad,
                          value_range=(float(low), float(high)))


def _series(uow: UnitOfWork, study_uid: str, series_uid: str) -> Series:
    series = uow.session.scalar(
        select(Series).join(Study).where(Series.series_uid == series_uid, Study.study_uid == study_uid)
        .options(selectinload(Series.instances).selectinload(Instance.encodings)))
    if series is None:
        raise NotFoundError(f"no series {series_uid!r} in study {study_uid!r}")
    return series


def _instance(uow: UnitOfWork, sop_instance_uid: str) -> Instance:
    instance = uow.session.scalar(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid, Instance.conflict_seq == 0)
        .options(selectinload(Instance.encodings)))
    if instance is None:
        raise NotFoundError(f"no instance with SOP Instance UID {sop_instance_uid!r}")
    return instance


def _released(uow: UnitOfWork, instances: list[Instance]) -> bool:
    """Whether a source of these (derived) instances had its lossless form released by a policy."""
    sources = [i.derived_from_id for i in instances if i.derived_from_id is not None]
    return bool(sources) and uow.session.scalar(
        select(Instance.id).where(Instance.id.in_(sources), Instance.status == InstanceStatus.LOSSY_ONLY).limit(1)
    ) is not None


def _kind(derivation: Derivation | None, instances: list[Instance], released: bool = False) -> ViewKind:
    if not any(i.storage_mode is StorageMode.PIXELS for i in instances):
        return ViewKind.NO_PIXELS
    if derivation is not None and derivation.kind is DerivationKind.LOSSY:
        return ViewKind.LOSSY_RELEASED if released else ViewKind.LOSSY_DERIVED
    if derivation is not None and derivation.kind is DerivationKind.NORMALIZED:
        transform = derivation.transform or {}
        same_plan = "plane" in transform and "kernel" in transform and not transform.get("planes_differ")
        return ViewKind.NORMALIZED if same_plan and not derivation.across_slices else ViewKind.NORMALIZED_NEAREST
    lossy = any(_is_lossy(current_encoding(i)) for i in instances if _has_current(i))
    return ViewKind.LOSSY_STORED if lossy else ViewKind.LOSSLESS


def _is_lossy(encoding: Encoding) -> bool:
    return bool(encoding.max_error_bound) or encoding.psnr is not None


def _has_current(instance: Instance) -> bool:
    return any(e.is_current for e in instance.encodings)


def _header(uow: UnitOfWork, instance: Instance) -> Dataset:
    return read_header(uow.read_header(instance.header_blob, instance.header_dictionary))


def _photometric(instance: Instance) -> str:
    if not _has_current(instance):
        return instance.photometric_interpretation or "MONOCHROME2"
    side = current_encoding(instance).side_info or {}
    return str(side.get("photometric") or instance.photometric_interpretation or "MONOCHROME2")


def _label(instance: Instance, frame: int) -> str:
    number = instance.instance_number if instance.instance_number is not None else "?"
    return f"{number}" if (instance.number_of_frames or 1) == 1 else f"{number}, frame {frame + 1}"


def _figure(instance: Instance) -> Figure:
    e = current_encoding(instance)
    return Figure(instance_number=instance.instance_number, sop_instance_uid=instance.sop_instance_uid,
                  codec=e.codec_id, config=e.codec_config, bytes_before=e.bytes_before, bytes_after=e.bytes_after,
                  ratio=e.ratio, bits_per_pixel=e.bits_per_pixel, psnr=e.psnr, max_abs_error=e.max_abs_error,
                  bound=e.max_error_bound)


def _difference_scale(figures: list[Figure]) -> float | None:
    """The largest recorded error of the series (else its largest bound): one scale for every slice."""
    errors = [f.max_abs_error for f in figures if f.max_abs_error]
    bounds = [float(f.bound) for f in figures if f.bound]
    top = max(errors) if errors else max(bounds) if bounds else None
    return top if top and math.isfinite(top) else None


def _header_windows(header: Dataset) -> list[tuple[str, Window]]:
    """Every window (0028,1050)/(0028,1051) declares, named by its explanation where there is one."""
    centers, widths = header.get("WindowCenter"), header.get("WindowWidth")
    if centers is None or widths is None:
        return []
    centers = list(centers) if isinstance(centers, MultiValue) else [centers]
    widths = list(widths) if isinstance(widths, MultiValue) else [widths]
    names = header.get("WindowCenterWidthExplanation")
    names = list(names) if isinstance(names, MultiValue) else [names] if names else []
    out = []
    for index, (c, w) in enumerate(zip(centers, widths)):
        try:
            window = Window(float(c), float(w))
        except (TypeError, ValueError):
            continue
        if window.width > 0:
            name = str(names[index]) if index < len(names) and names[index] else f"header {index + 1}"
            out.append((name, window))
    if not out and (first := header_window(header)) is not None:
        out.append(("header", first))
    return out


def _trial(trial: CodecTrial) -> dict[str, Any]:
    """The auto codec's candidates on its sample (:class:`archive.codecs.auto.Trial`): codec, bytes, bits per pixel."""
    result = trial.result or {}
    pixels = int(result.get("pixels") or 0)
    candidates = []
    for row in result.get("candidates") or []:
        if not isinstance(row, dict):
            continue
        config = row.get("config") or {}
        nbytes = int(row.get("bytes") or 0)
        candidates.append({"codec": str(config.get("id", "?")), "config": config, "bytes": nbytes,
                           "bpp": 8.0 * nbytes / pixels if pixels else None, "encode_ms": row.get("encode_ms"),
                           "ok": bool(row.get("ok")), "reason": str(row.get("reason") or ""),
                           "winner": config == trial.winner})
    return {"series_uid": trial.series_uid, "winner": trial.winner, "sampled": trial.sampled,
            "candidates": candidates}
