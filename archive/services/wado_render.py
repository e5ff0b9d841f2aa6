"""WADO-RS frames and rendered images: one instance's frames (decoded or as stored), the instance a series shows.

Frames of instances stored as frames are read alone (one ranged, sha256-checked
read each); passthrough and whole objects are decoded by pydicom from the object
as stored. See :mod:`archive.services.wado` for which codestreams go out as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from archive.catalog.models import Encoding, Instance, InstanceStatus, Series, Study
from archive.codecs import decode_frame
from archive.dicom.writer import read_header
from archive.errors import LossyOnlyError, NotAcceptableError, NotFoundError
from archive.kinds import StorageMode
from archive.services.blobs import read_blobs, read_context
from archive.services.retrieve import current_encoding, instance_part10, layout_of, lossy_derivative
from archive.services.runtime import Archive
from archive.services.unit_of_work import UnitOfWork
from archive.services.wado import stored_jpegls


def representative_instance(archive: Archive, study_uid: str, series_uid: str | None) -> tuple[str, str]:
    """(series, SOP) of the middle instance of a series; for a study, of its first original series with one."""
    with archive.unit_of_work() as uow:
        study_id = uow.session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if study_id is None:
            raise NotFoundError(f"no study with Study Instance UID {study_uid!r}")
        query = (select(Series.series_uid, Instance.sop_instance_uid)
                 .join(Instance, Instance.series_id == Series.id)
                 .where(Series.study_id == study_id, Instance.conflict_seq == 0,
                        Instance.status != InstanceStatus.LOSSY_ONLY)
                 .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id))
        if series_uid is not None:
            query = query.where(Series.series_uid == series_uid)
        else:
            query = query.where(Series.derived_from_id.is_(None))
        rows = uow.session.execute(query).all()
        if not rows:
            raise NotFoundError(f"no instance to render in {series_uid or study_uid!r}")
        first_series = rows[0].series_uid
        members = [row for row in rows if row.series_uid == first_series]
        chosen = members[len(members) // 2]
        return chosen.series_uid, chosen.sop_instance_uid


@dataclass(frozen=True)
class FrameSource:
    """One instance's frames for /frames and /rendered: the decoded pixels or the stored codestreams."""

    sop_instance_uid: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str  # of the decoded pixels
    header: bytes  # Part 10 without Pixel Data (or the whole object)
    frames: list[np.ndarray | None]  # None: not decoded (its stored codestream is sent as it is)
    stored_jpegls: list[bytes | None]

    def frame(self, index: int) -> np.ndarray:
        """A decoded frame (read with ``decode``, or one whose codestream had to be transcoded)."""
        frame = self.frames[index]
        assert frame is not None, "frame not decoded"
        return frame


def resolve_instance(uow: UnitOfWork, study_uid: str, series_uid: str, sop_instance_uid: str) -> Instance:
    """The (non-conflict) instance at that path, or 404: unknown, or an original released to a lossy derivative."""
    instance = uow.session.scalar(
        select(Instance).join(Series, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id)
        .where(Study.study_uid == study_uid, Series.series_uid == series_uid,
               Instance.sop_instance_uid == sop_instance_uid, Instance.conflict_seq == 0)
        .options(selectinload(Instance.encodings).selectinload(Encoding.frames)))
    if instance is None:
        raise NotFoundError(f"no instance {sop_instance_uid!r} in series {series_uid!r} of study {study_uid!r}")
    if instance.status is InstanceStatus.LOSSY_ONLY:
        derivative = lossy_derivative(uow.session, instance)
        raise LossyOnlyError(f"instance {sop_instance_uid}: its lossless original was released by a policy; only "
                             f"a lossy derivative is held: {derivative.sop_instance_uid if derivative else '(none)'}")
    return instance


def read_frames(archive: Archive, study_uid: str, series_uid: str, sop_instance_uid: str,
                numbers: list[int] | None, *, decode: bool = True) -> FrameSource:
    """Frames ``numbers`` (1-based; None: the first) of an instance; unknown numbers are a 404.

    Without ``decode`` (an ``image/jls`` request) only frames whose stored
    codestream cannot be sent as it is are decoded; the others stay None.
    """
    with archive.unit_of_work() as uow:
        instance = resolve_instance(uow, study_uid, series_uid, sop_instance_uid)
        count = instance.number_of_frames or 1
        wanted = numbers or [1]
        for number in wanted:
            if not 1 <= number <= count:
                raise NotFoundError(f"instance {sop_instance_uid} has {count} frame(s), not frame {number}")
        bits_allocated = instance.bits_allocated or 0
        if bits_allocated not in (8, 16) and instance.storage_mode is not StorageMode.PIXELS:
            raise NotAcceptableError(f"frames of {bits_allocated}-bit data are not offered (send the instance)")
        header = uow.read_header(instance.header_blob, instance.header_dictionary)
        if instance.storage_mode is StorageMode.PIXELS:
            encoding = current_encoding(instance)
            digests = [encoding.frames[n - 1].blob_sha256 for n in wanted]
            blobs = read_blobs(uow.session, uow.store, digests)
            layout = layout_of(instance)
            stored = [stored_jpegls(b, layout) for b in blobs]
            needed = [decode or s is None for s in stored]
            context = read_context(uow.session, uow.store, encoding.context_blob) if any(needed) else None
            frames: list[np.ndarray | None] = [decode_frame(b, context) if need else None
                                               for b, need in zip(blobs, needed)]
            photometric = layout.output_photometric
        else:
            decoded, photometric = _decoded_by_pydicom(uow, instance, wanted)
            frames = list(decoded)
            stored = [None] * len(wanted)
        return FrameSource(sop_instance_uid, bits_allocated, instance.bits_stored or bits_allocated,
                           instance.pixel_representation or 0, photometric, header, frames, stored)


def _decoded_by_pydicom(uow: UnitOfWork, instance: Instance, wanted: list[int]) -> tuple[list[np.ndarray], str]:
    """Frames of a passthrough or whole object, decoded by pydicom from the object as stored."""
    from pydicom.pixels.utils import pixel_array

    data, _, _ = instance_part10(uow, instance, "original")
    ds = read_header(data)
    if "PixelData" not in ds:
        raise NotAcceptableError(f"instance {instance.sop_instance_uid} has no pixel data")
    try:
        frames = [pixel_array(ds, index=n - 1, raw=True) for n in wanted]
    except Exception as exc:
        raise NotAcceptableError(f"instance {instance.sop_instance_uid}: its pixels cannot be decoded here ({exc})"
                                 ) from exc
    return frames, str(ds.get("PhotometricInterpretation", "MONOCHROME2"))


def native_frame(frame: np.ndarray, source: FrameSource) -> bytes:
    """One frame as PS3.5 native little-endian bytes (colour pixel-interleaved)."""
    dtype = np.dtype(("<i" if source.pixel_representation else "<u") + str(max(source.bits_allocated // 8, 1)))
    return np.ascontiguousarray(frame).astype(dtype, copy=False).tobytes()


def jpegls_frame(source: FrameSource, index: int) -> bytes:
    """The frame as a JPEG-LS Lossless codestream: the stored one when conformant, else encoded now by pydicom."""
    stored = source.stored_jpegls[index]
    if stored is not None:
        return stored
    frame = source.frame(index)
    from pydicom.pixels.encoders.base import JPEGLSLosslessEncoder

    samples = frame.shape[2] if frame.ndim == 3 else 1
    options: dict[str, Any] = dict(
        rows=frame.shape[0], columns=frame.shape[1], samples_per_pixel=samples, number_of_frames=1,
        bits_allocated=source.bits_allocated, bits_stored=source.bits_stored,
        pixel_representation=source.pixel_representation,
        photometric_interpretation=source.photometric if samples == 1 else "RGB", planar_configuration=0)
    try:
        return bytes(JPEGLSLosslessEncoder.encode(np.ascontiguousarray(frame), **options))
    except Exception as exc:
        raise NotAcceptableError(f"frame cannot be sent as image/jls ({exc})") from exc


