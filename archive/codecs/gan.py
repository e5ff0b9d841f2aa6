"""``gan``: a conditional-GAN image compressor (encoder -> integer latent -> generator), lossy, for extreme rates.

What it is for: research copies of datasets at very low rates (below ~0.1 bpp) where a learned
transform can spend its bits on structure; what it is not for: diagnosis. Its reconstruction comes
from float convolutions (the generator), so it promises no per-pixel bound (``max_error`` None), is
never a default, never used inside ``bounded``, and is ``deterministic = False``: its frames are
guarded by the payload CRC, since the generator's output may differ by an ulp on another machine.

The payload is bit-exact where it matters: the latent symbols are range coded (constriction) with a
factorized prior whose tables are fixed integers in the bundle (one table per level and channel), so
entropy decoding gives the same symbols everywhere. Intensities keep the full stored range: each
image is normalised with its own (lo, hi), recorded in the payload.

Rate control: the model is trained at N_RATES lambdas and interpolates between them (N_LEVELS levels);
per image the codec range codes the latent at every level and keeps the highest level whose REAL
payload (bytes * 8 / pixels) fits ``bpp``, the smallest payload when none does.

Payload (integers little-endian, v = LEB128 varint, z = zig-zag varint)::

    b"GN" | version u8 | len u8, bundle name | weights SHA-256[:8] | level u8 | modality u8 |
    z lo | z hi | v rows | v cols | v latent channels | v latent rows | v latent cols | range-coder words (u32)
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, cast

import constriction
import numpy as np
import numpy.typing as npt

from archive.codecs._entropy import get_varint, put_varint, unzigzag, zigzag
from archive.codecs._pixels import Pixels
from archive.codecs.base import Codec, CodecConfig, EncodedPayload, dist_version
from archive.codecs.frame import FrameHeader, pack_frame
from archive.errors import CodecError

_MAGIC: Final[bytes] = b"GN"
_VERSION: Final[int] = 1
#: beta (GanConfig) -> shipped bundle
SHIPPED: Final[dict[int, str]] = {0: "gan-b0-v1", 1: "gan-b1-v1"}
MODALITY_NAMES: Final[tuple[str, ...]] = ("CT", "MR", "OT")
MIN_BPP: Final[float] = 0.01
MAX_BPP: Final[float] = 2.0

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class GanConfig(CodecConfig):
    """``bpp``: target rate (real payload bits per pixel); ``beta``: 0 the MSE-trained bundle, 1 the adversarial
    one; ``modality``: CT, MR, OT or auto (the services put the series modality in; bare "auto" means OT)."""

    bpp: float = 0.1
    beta: int = 0
    modality: str = "auto"

    def validate(self) -> None:
        if isinstance(self.bpp, bool) or not isinstance(self.bpp, (int, float)) or not (
                MIN_BPP <= float(self.bpp) <= MAX_BPP):
            raise CodecError(f"gan bpp must be a number in {MIN_BPP}..{MAX_BPP}, got {self.bpp!r}")
        if type(self.beta) is not int or self.beta not in SHIPPED:
            raise CodecError(f"gan beta must be one of {sorted(SHIPPED)}, got {self.beta!r}")
        if self.modality not in (*MODALITY_NAMES, "auto"):
            raise CodecError(f"gan modality must be CT, MR, OT or auto, got {self.modality!r}")


@dataclass(frozen=True)
class LoadedModel:
    """A bundle made ready for coding: torch modules in eval mode, integer tables, per-level gains."""

    name: str
    digest8: bytes
    model: Any  # archive.learned.gan.GanModel (torch is imported lazily)
    tables: npt.NDArray[np.int32]  # (levels, channels, 2 * half + 1)
    gains: F32  # (levels, channels)
    half: int
    _models: dict[tuple[int, int], Any] = field(default_factory=dict, compare=False, repr=False)

    def categorical(self, level: int, channel: int) -> Any:
        """The range-coder model of one table: integer frequencies / their sum (exact in float64)."""
        key = (level, channel)
        if key not in self._models:
            table = self.tables[level, channel].astype(np.float64)
            self._models[key] = constriction.stream.model.Categorical(table / table.sum(), perfect=False)
        return self._models[key]

    @property
    def levels(self) -> int:
        return int(self.tables.shape[0])


@functools.cache
def load_model(name: str) -> LoadedModel:
    """Load a bundle (by shipped name or folder path) into torch modules; cached per process."""
    import torch

    from archive.learned import gan as nets
    from archive.learned.bundle import load_bundle

    bundle = load_bundle(name)
    if bundle.manifest.get("model") != "gan":
        raise CodecError(f"bundle {name!r} is not a gan model")
    model = nets.GanModel()
    state = {k[len("model."):]: torch.from_numpy(np.array(v, dtype=np.float32))
             for k, v in bundle.tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CodecError(f"bundle {name!r} does not fit the gan network: {exc}") from exc
    model.eval()
    tables = np.asarray(bundle.tensors["tables"], np.int32)
    gains = np.asarray(bundle.tensors["gains"], np.float32)
    if tables.shape != (nets.N_LEVELS, nets.LATENT, 2 * nets.HALF + 1) or gains.shape != tables.shape[:2]:
        raise CodecError(f"bundle {name!r} has tables of another shape")
    if int(tables.min()) < 1:
        raise CodecError(f"bundle {name!r} has a zero frequency")
    return LoadedModel(bundle.name, bytes.fromhex(bundle.weights_sha256)[:8], model, tables, gains, nets.HALF)


def _padded(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    return (-(-shape[0] // factor) * factor, -(-shape[1] // factor) * factor)


def normalise(arr: Pixels) -> tuple[F32, int, int]:
    """Stored values -> float32 in [-0.5, 0.5] with the image's own (lo, hi)."""
    lo, hi = int(arr.min()), int(arr.max())
    x = (arr.astype(np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1)) - np.float32(0.5)
    return x, lo, hi


def analyse(loaded: LoadedModel, arr: Pixels) -> tuple[F32, int, int]:
    """E(x) before gain and rounding, (channels, rows/16, cols/16), and the image's (lo, hi)."""
    import torch

    from archive.learned.gan import FACTOR

    x, lo, hi = normalise(arr)
    rows, cols = _padded((x.shape[0], x.shape[1]), FACTOR)
    x = np.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])), mode="edge")
    with torch.inference_mode():
        y = loaded.model.encoder(torch.from_numpy(np.ascontiguousarray(x))[None, None])[0]
    return cast(F32, y.numpy().astype(np.float32)), lo, hi


def quantize(loaded: LoadedModel, y: F32, level: int) -> I64:
    """Integer symbols of a level: round(E(x) * gain), clamped to the tables' range."""
    scaled = y * loaded.gains[level][:, None, None]
    out: I64 = np.clip(np.rint(scaled), -loaded.half, loaded.half).astype(np.int64)
    return out


def code_symbols(loaded: LoadedModel, symbols: I64, level: int) -> bytes:
    """Range code (channels, h, w) symbols with the level's integer tables."""
    encoder = constriction.stream.queue.RangeEncoder()
    for c in range(symbols.shape[0]):
        encoder.encode((symbols[c].ravel() + loaded.half).astype(np.int32), loaded.categorical(level, c))
    return bytes(encoder.get_compressed().astype("<u4").tobytes())


def decode_symbols(loaded: LoadedModel, words: bytes, level: int, latent_shape: tuple[int, int, int]) -> I64:
    """Mirror of :func:`code_symbols`: integer symbols only, bit-exact on any machine."""
    if len(words) % 4:
        raise CodecError("gan payload corrupt (range coder words)")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(words, "<u4").astype(np.uint32))
    channels, h, w = latent_shape
    out = np.zeros(latent_shape, np.int64)
    try:
        for c in range(channels):
            out[c] = np.asarray(decoder.decode(loaded.categorical(level, c), h * w), np.int64).reshape(h, w)
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CodecError(f"gan payload corrupt: {exc}") from exc
    return out - loaded.half


def synthesise(loaded: LoadedModel, symbols: I64, level: int, modality: int) -> F32:
    """G(w / gain, s) on the padded grid, in [-0.5, 0.5] units (float: may differ by an ulp across machines)."""
    import torch

    from archive.learned.gan import level_side

    w = symbols.astype(np.float32) / loaded.gains[level][:, None, None]
    with torch.inference_mode():
        x = loaded.model.generator(torch.from_numpy(np.ascontiguousarray(w))[None], level_side(level, modality))
    return cast(F32, x[0, 0].numpy().astype(np.float32))


def denormalise(x: F32, shape: tuple[int, int], lo: int, hi: int, dtype: np.dtype[Any]) -> Pixels:
    """Crop, rescale, round and clip to [lo, hi] and the dtype."""
    values = (x[: shape[0], : shape[1]].astype(np.float64) + 0.5) * max(hi - lo, 1) + lo
    return np.clip(np.rint(values), lo, hi).astype(dtype)


def pack_payload(loaded: LoadedModel, level: int, modality: int, lo: int, hi: int, shape: tuple[int, int],
                 latent_shape: tuple[int, int, int], words: bytes) -> bytes:
    name = loaded.name.encode("ascii")
    out = bytearray(_MAGIC)
    out += bytes([_VERSION, len(name)]) + name + loaded.digest8 + bytes([level, modality])
    for value in (zigzag(lo), zigzag(hi), *shape, *latent_shape):
        put_varint(out, value)
    return bytes(out + words)


@dataclass(frozen=True)
class ParsedPayload:
    name: str
    digest8: bytes
    level: int
    modality: int
    lo: int
    hi: int
    shape: tuple[int, int]
    latent_shape: tuple[int, int, int]
    words: bytes


def parse_payload(payload: bytes) -> ParsedPayload:
    """Read the header fields; refuses other magic or version (weights are checked by :func:`check_weights`)."""
    if len(payload) < 4 or payload[:2] != _MAGIC:
        raise CodecError("not a gan payload")
    if payload[2] != _VERSION:
        raise CodecError(f"gan payload version {payload[2]} is not readable (known: {_VERSION})")
    n = payload[3]
    pos = 4 + n + 8 + 2
    if len(payload) < pos:
        raise CodecError("gan payload truncated")
    try:
        name = payload[4 : 4 + n].decode("ascii")
    except UnicodeDecodeError as exc:
        raise CodecError("gan payload names no readable bundle") from exc
    digest8 = payload[4 + n : 12 + n]
    level, modality = payload[12 + n], payload[13 + n]
    values = []
    for _ in range(7):
        value, pos = get_varint(payload, pos)
        values.append(value)
    lo, hi = unzigzag(values[0]), unzigzag(values[1])
    shape = (values[2], values[3])
    latent = (values[4], values[5], values[6])
    return ParsedPayload(name, bytes(digest8), level, modality, lo, hi, shape, latent, bytes(payload[pos:]))


def check_weights(parsed: ParsedPayload) -> LoadedModel:
    """The bundle the payload names, refused unless its weights are the ones that encoded it."""
    loaded = load_model(parsed.name)
    if loaded.digest8 != parsed.digest8:
        raise CodecError(f"gan payload was made with other weights of {parsed.name!r} "
                         f"({parsed.digest8.hex()} != {loaded.digest8.hex()})")
    return loaded


def decode_to_symbols(payload: bytes) -> tuple[ParsedPayload, LoadedModel, I64]:
    """Parse, check weights and geometry, entropy decode: everything of decoding that is bit-exact."""
    from archive.learned.gan import FACTOR

    parsed = parse_payload(payload)
    loaded = check_weights(parsed)
    if parsed.level >= loaded.levels or parsed.modality >= len(MODALITY_NAMES):
        raise CodecError("gan payload corrupt (level or modality)")
    if parsed.hi < parsed.lo:
        raise CodecError("gan payload corrupt (value range)")
    rows, cols = _padded(parsed.shape, FACTOR)
    expected = (loaded.tables.shape[1], rows // FACTOR, cols // FACTOR)
    if parsed.latent_shape != expected:
        raise CodecError(f"gan payload corrupt (latent {parsed.latent_shape}, expected {expected})")
    return parsed, loaded, decode_symbols(loaded, parsed.words, parsed.level, parsed.latent_shape)


def encode_levels(loaded: LoadedModel, arr: Pixels, modality: int,
                  levels: range | list[int] | None = None) -> dict[int, bytes]:
    """The payload of ``arr`` at each level (one encoder pass; each level is a rounding and a range coding)."""
    y, lo, hi = analyse(loaded, arr)
    shape = (int(arr.shape[0]), int(arr.shape[1]))
    latent_shape = (int(y.shape[0]), int(y.shape[1]), int(y.shape[2]))
    out = {}
    for level in levels if levels is not None else range(loaded.levels):
        words = code_symbols(loaded, quantize(loaded, y, level), level)
        out[level] = pack_payload(loaded, level, modality, lo, hi, shape, latent_shape, words)
    return out


def decode_payload_array(payload: bytes, dtype: np.dtype[Any]) -> Pixels:
    """Payload -> reconstruction of ``dtype`` (the container's shape check is the caller's)."""
    parsed, loaded, symbols = decode_to_symbols(payload)
    x = synthesise(loaded, symbols, parsed.level, parsed.modality)
    return denormalise(x, parsed.shape, parsed.lo, parsed.hi, dtype)


def choose(payloads: dict[int, bytes], budget_bytes: float) -> int:
    """The highest level whose payload fits the budget, else the level with the smallest payload."""
    fitting = [lv for lv, p in payloads.items() if len(p) <= budget_bytes]
    if fitting:
        return max(fitting)
    return min(payloads, key=lambda lv: (len(payloads[lv]), lv))


class GanCodec(Codec):
    """Conditional-GAN compressor: lossy, non-deterministic reconstruction, exact entropy decoding."""

    codec_id: ClassVar[str] = "gan"
    config_class: ClassVar[type[CodecConfig]] = GanConfig
    deterministic: ClassVar[bool] = False

    @property
    def config(self) -> GanConfig:
        return cast(GanConfig, self._config)

    @property
    def max_error(self) -> int | None:
        return None

    @property
    def bundle_name(self) -> str:
        return SHIPPED[self.config.beta]

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        if arr.ndim != 2 or arr.size == 0:
            return None  # colour: zstd fallback
        loaded = load_model(self.bundle_name)
        modality = self.config.modality if self.config.modality != "auto" else "OT"
        payloads = encode_levels(loaded, arr, MODALITY_NAMES.index(modality))
        # the target is the stored frame's rate: its container header counts (56 bytes: 0.11 bpp on a 64² MR)
        level = choose(payloads, float(self.config.bpp) * arr.size / 8.0 - _frame_overhead())
        payload = payloads[level]
        stats = {"bundle": loaded.name, "level": level, "modality": modality,
                 "bpp": len(payload) * 8.0 / arr.size, "fits": len(payload) * 8.0 <= float(self.config.bpp) * arr.size}
        return EncodedPayload(payload, arr.dtype, 0, stats=stats)

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        if len(header.shape) != 2:
            raise CodecError("gan payloads are 2-D")
        out = decode_payload_array(payload, header.payload_dtype)
        if out.shape != tuple(header.shape):
            raise CodecError(f"gan payload shape {out.shape} does not match the frame {tuple(header.shape)}")
        return out

    def _library_versions(self) -> dict[str, str]:
        return {"constriction": dist_version("constriction"), "torch": dist_version("torch")}


@functools.cache
def _frame_overhead() -> int:
    """Bytes the frame container adds to a 2-D gan payload (a fixed-size header)."""
    probe = np.zeros((1, 1), np.uint16)
    return len(pack_frame(codec_id=GanCodec.codec_id, pixels=probe, offset=0, payload_dtype=probe.dtype, payload=b"",
                          lossy=True, deterministic=False))


def latent_digest(payload: bytes) -> str:
    """SHA-256 of the entropy-decoded symbols (int64 little-endian): what must match on every machine."""
    _parsed, _loaded, symbols = decode_to_symbols(payload)
    return hashlib.sha256(symbols.astype("<i8").tobytes()).hexdigest()


