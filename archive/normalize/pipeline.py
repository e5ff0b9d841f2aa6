"""One series normalized in memory: plan each plane, resample, derive headers, measure the error.

Pure computation on decoded images and their headers (no catalog, no
store): :mod:`archive.services.normalization` loads the source series,
calls :func:`normalize_series_images` and records the result.

What a radiologist measures must not change: every output plane's geometry
comes from the source's Pixel Spacing / Imager Pixel Spacing, Image
Orientation and Image Position (:mod:`archive.dicom.geometry`), never from
array sizes, and sample values stay in stored units (same Rescale
Slope/Intercept, same Bits Stored range). The error is measured by resampling
the normalized image back onto the source grid (linear) over the pixels both
cover, and reported in modality units (HU for CT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from archive.dicom.derive import attach_pixels, derive_header, derived_instance_uid, derived_series_uid, params_sha256
from archive.dicom.geometry import PlaneGeometry, plane_geometries
from archive.normalize.grid import Interpolation, StackWarning
from archive.normalize.plan import PlanePlan, PlaneTarget, plan_plane, plan_slices
from archive.normalize.profiles import SEGMENTATION_SOP_CLASSES, NormalizeProfile
from archive.normalize.resample import resample_plane, resample_slices, round_trip_error
from archive.normalize.stack import analyse_stack

CT_BACKGROUND_HU = -1024.0


@dataclass
class SourceImage:
    """One archived instance with pixels: its header and its frames (N, rows, columns[, samples]) as stored."""

    dataset: Dataset
    frames: np.ndarray
    sop_instance_uid: str
    instance_id: int | None = None


@dataclass
class DerivedImage:
    dataset: Dataset  # header with Pixel Data attached
    main_source: int  # index into the sources: the nearest one (the catalog's derived_from)
    sources: list[int]


@dataclass
class NormalizedSeries:
    """A normalized series and how it was made, or why it was not."""

    profile: str
    params: dict[str, Any]
    params_sha256: str
    series_uid: str
    version: str = ""
    images: list[DerivedImage] = field(default_factory=list)
    skipped: str | None = None  # the reason nothing was made
    source_geometry: dict[str, Any] = field(default_factory=dict)
    target_geometry: dict[str, Any] = field(default_factory=dict)
    transform: dict[str, Any] = field(default_factory=dict)
    interpolation: str = ""
    across_slices: bool = False
    warnings: list[tuple[StackWarning | None, str]] = field(default_factory=list)
    rmse: float | None = None
    max_abs_error: float | None = None
    error_pixels: int | None = None


def profile_sha256(profile: NormalizeProfile, version: str) -> str:
    """What the derived UIDs come from: the profile's full parameters and the software version."""
    return params_sha256({**profile.params(), "software_version": version})


def normalize_series_images(sources: Sequence[SourceImage], profile: NormalizeProfile, *, version: str,
                            plan_only: bool = False, kernel: Interpolation | None = None) -> NormalizedSeries:
    """Normalize one series' images with ``profile`` (``plan_only``: geometry and checks, no pixels).

    ``kernel`` overrides the profile's choice: a part of a series resampled apart from the rest uses the
    kernel planned for the whole series.
    """
    params = profile.params()
    params_sha = profile_sha256(profile, version)
    first = sources[0].dataset
    result = NormalizedSeries(profile=profile.name, params=params, params_sha256=params_sha, version=version,
                              series_uid=derived_series_uid(str(first.SeriesInstanceUID), params_sha, version))
    planes = [plane_geometries(source.dataset) for source in sources]
    target = PlaneTarget(rows=profile.rows, columns=profile.columns, spacing_mm=profile.spacing_mm, fit=profile.fit,
                         allow_upsample=profile.allow_upsample)
    plans = [plan_plane(p[0], target) for p in planes]
    result.source_geometry = planes[0][0].as_dict() | {"instances": len(sources)}
    result.target_geometry = plans[0].output.as_dict()
    notes = sorted({note for plan in plans for note in plan.notes})
    result.warnings.extend((None, note) for note in notes)
    upsampling = [plan for plan in plans if plan.upsamples]
    if upsampling and not profile.allow_upsample:
        source_mm = planes[plans.index(upsampling[0])][0].spacing
        result.skipped = (f"acquired at {_mm(source_mm)} mm, coarser than the {_mm(upsampling[0].output.spacing)} mm "
                          f"of profile {profile.name}: "
                          f"not enlarged beyond its acquired resolution (allow_upsample = true to enlarge)")
        return result
    label_map = _is_label_map(first)
    shrinking = all(min(plan.scale) >= 1.0 - 1e-9 for plan in plans)
    kernel = kernel or profile.interpolation_for(shrinking, label_map)
    result.interpolation = kernel.value
    result.transform = {"plane": plans[0].as_dict(), "kernel": kernel.value,
                        "planes_differ": len({_plan_key(p) for p in plans}) > 1}

    order, slice_plan, stack_warnings = _across_slices(profile, sources, planes)
    result.warnings.extend(stack_warnings)
    if plan_only:
        result.across_slices = slice_plan is not None
        return result

    pad = _pad_value(first, profile)
    value_range = _stored_range(first)
    resampled = [resample_plane(source.frames, plan.rows, plan.columns, kernel, pad_value=pad,
                                value_range=value_range, frames=True) for source, plan in zip(sources, plans)]
    slope = abs(float(first.get("RescaleSlope", 1) or 1))
    if slice_plan is None:
        result.images = [_derive_in_plane(result, sources, i, plans[i], resampled[i], pad) for i in range(len(sources))]
        errors = [round_trip_error(sources[i].frames[f], resampled[i][f], plans[i].rows, plans[i].columns)
                  for i in range(len(sources)) for f in range(len(sources[i].frames))]
    else:
        result.across_slices = True
        result.images, errors = _derive_across(result, sources, order, plans, resampled, slice_plan, kernel, pad,
                                               value_range)
    errors = [e for e in errors if e.pixels]
    pixels = sum(e.pixels for e in errors)
    if pixels:
        result.rmse = slope * math.sqrt(sum(e.rmse ** 2 * e.pixels for e in errors) / pixels)
        result.max_abs_error = slope * max(e.max_abs for e in errors)
    result.error_pixels = pixels
    return result


def _across_slices(profile: NormalizeProfile, sources: Sequence[SourceImage], planes: list[list[PlaneGeometry]]
                   ) -> tuple[list[int], Any, list[tuple[StackWarning | None, str]]]:
    """The slice order and the slice plan when the profile asks for it and the stack allows it."""
    if profile.slice_spacing_mm is None:
        return list(range(len(sources))), None, []
    if any(len(p) > 1 for p in planes):
        return list(range(len(sources))), None, [
            (None, "multi-frame images are normalized in-plane only (slice spacing not applied)")]
    stack = analyse_stack([p[0] for p in planes])
    if not stack.across_ok:
        return stack.order, None, [(w, m) for w, m in zip(stack.warnings, stack.messages)] + [
            (None, "normalized in-plane only: the stack cannot be resampled across slices safely")]
    return stack.order, plan_slices(stack, profile.slice_spacing_mm), []


def _derive_in_plane(result: NormalizedSeries, sources: Sequence[SourceImage], index: int, plan: PlanePlan,
                     frames: np.ndarray, pad: int) -> DerivedImage:
    source = sources[index]
    output_planes = _frame_planes(source.dataset, plan)
    ds = derive_header(
        source.dataset, series_uid=result.series_uid,
        sop_instance_uid=derived_instance_uid(source.sop_instance_uid, result.params_sha256, result.version),
        planes=output_planes, sources=[source.dataset], profile=result.profile,
        description=_description(result, plan), series_number=_series_number(source.dataset),
        series_description=_series_description(source.dataset, result.profile),
        instance_number=_int(source.dataset.get("InstanceNumber")), pad_value=pad)
    attach_pixels(ds, frames)
    return DerivedImage(ds, index, [index])


def _derive_across(result: NormalizedSeries, sources: Sequence[SourceImage], order: list[int], plans: list[PlanePlan],
                   resampled: list[np.ndarray], slice_plan: Any, kernel: Interpolation, pad: int,
                   value_range: tuple[float, float]) -> tuple[list[DerivedImage], list[Any]]:
    """Resample an in-plane-normalized stack along its normal onto ``slice_plan``; error measured back on the source."""
    stack = np.stack([resampled[i][0] for i in order])
    base = plans[order[0]].output
    # positions along the normal, as the slice plan gives them (in-plane resampling moves nothing along it)
    positions = np.array([plans[i].output.slice_position() for i in order], dtype=np.float64)
    targets = np.asarray(slice_plan.positions, dtype=np.float64)
    z_kernel = Interpolation.AREA if slice_plan.spacing > float(np.median(np.diff(positions))) else Interpolation.LINEAR
    if kernel is Interpolation.NEAREST:
        z_kernel = Interpolation.NEAREST
    volume, contributors = resample_slices(stack, positions, targets, z_kernel, pad_value=pad,
                                           value_range=value_range)
    result.transform["slices"] = {"positions_mm": [float(p) for p in targets], "spacing_mm":
                                  float(slice_plan.spacing), "kernel": z_kernel.value, "source_positions_mm":
                                  [float(p) for p in positions]}
    images = []
    for k, z in enumerate(targets):
        contributing = [order[j] for j in contributors[k]] or [order[int(np.argmin(np.abs(positions - z)))]]
        nearest = order[int(np.argmin(np.abs(positions - z)))]
        plane = base.moved_to(float(z))
        source = sources[nearest]
        ds = derive_header(
            source.dataset, series_uid=result.series_uid,
            sop_instance_uid=derived_instance_uid(f"{result.series_uid}.{k}", result.params_sha256, result.version),
            planes=[plane], sources=[sources[i].dataset for i in contributing], profile=result.profile,
            description=_description(result, plans[nearest]), series_number=_series_number(source.dataset),
            series_description=_series_description(source.dataset, result.profile), instance_number=k + 1,
            slice_thickness=float(slice_plan.thickness), spacing_between_slices=float(slice_plan.spacing),
            pad_value=pad)
        attach_pixels(ds, volume[k][np.newaxis])
        images.append(DerivedImage(ds, nearest, contributing))
    back, _ = resample_slices(volume, targets, positions,
                              Interpolation.LINEAR, pad_value=pad, value_range=value_range)
    inside = (positions >= targets[0] - 1e-6) & (positions <= targets[-1] + 1e-6)
    errors = [round_trip_error(sources[i].frames[0], back[j], plans[i].rows, plans[i].columns)
              for j, i in enumerate(order) if inside[j]]
    return images, errors


def _frame_planes(ds: Dataset, plan: PlanePlan) -> list[PlaneGeometry]:
    """Per-frame output planes: the plan's plane moved to each source frame's position (enhanced multi-frame)."""
    frames = plane_geometries(ds)
    if len(frames) <= 1 or plan.output.position is None:
        return [plan.output] * max(len(frames), 1)
    first = frames[0]
    out = []
    for frame in frames:
        if frame.position is None or first.position is None:
            out.append(plan.output)
            continue
        moved = np.asarray(plan.output.position) + np.asarray(frame.position) - np.asarray(first.position)
        out.append(replace(plan.output, position=(float(moved[0]), float(moved[1]), float(moved[2]))))
    return out


def _is_label_map(ds: Dataset) -> bool:
    return (str(ds.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES or str(ds.get("Modality", "")) == "SEG"
            or int(ds.get("BitsAllocated", 8) or 8) == 1)


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0):
        return float(-(1 << (bits - 1))), float((1 << (bits - 1)) - 1)
    return 0.0, float((1 << bits) - 1)


def _pad_value(ds: Dataset, profile: NormalizeProfile) -> int:
    """The profile's, else the source's Pixel Padding Value, else the modality's background, as a stored value."""
    low, high = _stored_range(ds)
    if profile.pad_value is not None:
        value = float(profile.pad_value)
    elif "PixelPaddingValue" in ds and isinstance(ds.PixelPaddingValue, int):
        value = float(ds.PixelPaddingValue)
    elif str(ds.get("Modality", "")) == "CT":
        slope = float(ds.get("RescaleSlope", 1) or 1)
        value = round((CT_BACKGROUND_HU - float(ds.get("RescaleIntercept", 0) or 0)) / slope)
    elif str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        value = high  # black on a MONOCHROME1 display
    else:
        value = 0.0 if low <= 0.0 <= high else low  # MR and the rest: 0
    return int(min(max(value, low), high))


def _plan_key(plan: PlanePlan) -> tuple[Any, ...]:
    return (plan.rows, plan.columns)


def _description(result: NormalizedSeries, plan: PlanePlan) -> str:
    out = plan.output
    spacing = f"{_mm(out.spacing)} mm" if out.spacing else "matrix only (no spacing)"
    text = (f"medarchive normalize profile {result.profile}: spatial resampling to {out.rows}x{out.columns} at "
            f"{spacing}, {result.interpolation} interpolation, {'padded/cropped' if plan.pad_crop else 'scaled'} "
            f"around the field centre; step {plan.scale[0]:.6g}x{plan.scale[1]:.6g} source px per output px")
    if result.across_slices and result.transform.get("slices"):
        text += f"; resampled across slices to {result.transform['slices']['spacing_mm']:g} mm"
    return text[:1024]


def _series_number(ds: Dataset) -> int | None:
    number = _int(ds.get("SeriesNumber"))
    return None if number is None else number + 1000


def _series_description(ds: Dataset, profile: str) -> str:
    return f"{str(ds.get('SeriesDescription', '') or '').strip()} [normalized {profile}]".strip()[:64]


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _mm(spacing: tuple[float, float] | None) -> str:
    if spacing is None:
        return "?"
    if abs(spacing[0] - spacing[1]) < 1e-9:
        return f"{spacing[0]:.6g}"
    return f"{spacing[0]:.6g} x {spacing[1]:.6g}"


__all__ = ["DerivedImage", "NormalizedSeries", "SourceImage", "normalize_series_images", "profile_sha256"]
