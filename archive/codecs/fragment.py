"""An original lossless DICOM codestream kept as it arrived, inside a frame container.

When the configured codec would store a lossless-compressed input (JPEG-LS,
JPEG 2000 reversible, RLE, JPEG lossless) larger than it arrived, staging
keeps the original fragment instead: :func:`wrap_fragment` puts it in the
usual self-describing container, with the transfer syntax and the pixel
layout its decoder needs, and the pixel CRC of the values decoded at ingest.
``decode_frame`` then gives back those values bit for bit (or raises), so
retrieval needs nothing special for it. Not a configurable codec: it cannot
encode pixels, only keep a codestream.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import UID

from archive.codecs._pixels import Pixels
from archive.codecs.base import Codec, CodecConfig, EncodedPayload, dist_version
from archive.codecs.frame import FrameHeader, pack_frame
from archive.errors import CodecError

_LAYOUT = struct.Struct("<BBBBB")  # bits allocated, bits stored, pixel representation, planar configuration, spp


@dataclass(frozen=True)
class FragmentConfig(CodecConfig):
    """No parameters: the codestream is the one that arrived."""


@dataclass(frozen=True)
class FragmentLayout:
    """What a DICOM decoder needs besides the codestream."""

    transfer_syntax_uid: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    planar_configuration: int
    photometric_interpretation: str


class FragmentCodec(Codec):
    """Decodes kept original fragments; refuses to encode (see :func:`wrap_fragment`)."""

    codec_id: ClassVar[str] = "dicom-fragment"
    config_class: ClassVar[type[CodecConfig]] = FragmentConfig

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        raise CodecError("dicom-fragment keeps original codestreams; it is not a codec to configure")

    def _library_versions(self) -> dict[str, str]:
        return {"pydicom": dist_version("pydicom")}

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        raise CodecError("dicom-fragment cannot encode pixels; staging wraps an original fragment instead")

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        layout, fragment = _unpack(payload)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(layout.transfer_syntax_uid)
        ds.Rows, ds.Columns = header.shape[0], header.shape[1]
        ds.SamplesPerPixel = header.shape[2] if len(header.shape) == 3 else 1
        ds.BitsAllocated = layout.bits_allocated
        ds.BitsStored = layout.bits_stored
        ds.HighBit = layout.bits_stored - 1
        ds.PixelRepresentation = layout.pixel_representation
        ds.PhotometricInterpretation = layout.photometric_interpretation
        if ds.SamplesPerPixel > 1:
            ds.PlanarConfiguration = layout.planar_configuration
        ds.NumberOfFrames = 1
        ds.PixelData = encapsulate([fragment])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = next(iter(iter_pixels(ds, raw=True)))
        return np.ascontiguousarray(frame).astype(header.payload_dtype.newbyteorder("="), copy=False)


def wrap_fragment(fragment: bytes, decoded: Pixels, layout: FragmentLayout) -> bytes:
    """A frame container holding ``fragment``, checked on decoding against ``decoded`` (the values at ingest)."""
    arr = np.ascontiguousarray(decoded)
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    ts = layout.transfer_syntax_uid.encode("ascii")
    photometric = layout.photometric_interpretation.encode("ascii")
    prefix = (bytes([len(ts)]) + ts + bytes([len(photometric)]) + photometric
              + _LAYOUT.pack(layout.bits_allocated, layout.bits_stored, layout.pixel_representation,
                             layout.planar_configuration, 0))
    return pack_frame(codec_id=FragmentCodec.codec_id, pixels=arr, offset=0, payload_dtype=arr.dtype,
                      payload=prefix + fragment)


def _unpack(payload: bytes) -> tuple[FragmentLayout, bytes]:
    try:
        n = payload[0]
        ts = payload[1:1 + n].decode("ascii")
        pos = 1 + n
        m = payload[pos]
        photometric = payload[pos + 1:pos + 1 + m].decode("ascii")
        pos += 1 + m
        bits_allocated, bits_stored, representation, planar, _ = _LAYOUT.unpack_from(payload, pos)
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise CodecError(f"dicom-fragment payload is malformed: {exc}") from exc
    layout = FragmentLayout(ts, bits_allocated, bits_stored, representation, planar, photometric)
    return layout, payload[pos + _LAYOUT.size:]
