"""``"auto"``: per series, the smallest of several lossless codecs, chosen on a sample.

No single lossless codec wins everywhere (ANCHORS.md: JPEG-XL effort 7 is the
smallest on CT and most MR, JPEG-LS ties it on Siemens MR at a twentieth of the
encode time, HTJ2K is the fastest). So the archive tries the candidates on a
few instances of a series (at most 10 %, at least one, spread evenly over the
series), keeps the smallest that decodes bit-exactly (and, with a speed budget,
is fast enough) and stores the whole series with it.

Everything here is pure: no I/O, no database. The services call
:func:`sample_indices`, :func:`run_trial` or :meth:`AutoCodec.choose`, record
:meth:`Trial.as_dict` in the catalog and encode the series with the winner.

An ``"auto"`` frame does not exist: :meth:`AutoCodec.encode` on one frame tries
every candidate on that frame and returns the winner's own container (labelled
with the codec that produced it), so ``decode_frame`` never meets ``"auto"``.

Speed is measured, not assumed: ``max_encode_ms`` is a budget per 512²
slice-equivalent (encode time of the sample scaled by 512² / pixels encoded);
candidates over it are excluded. JPEG-XL effort 3 joins the default candidates
only under a budget: without one, effort 7 is smaller on every series of
../shared/data, so effort 3 would never win and only lengthen the trial; with
one that excludes effort 7 (~100-300 ms per 512² slice here), effort 3 is what
keeps CT 2.6 % below JPEG-LS (4.54 vs 4.66 bpp at ~20 ms per slice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

import numpy as np

from archive.codecs._pixels import Pixels, validate_pixels
from archive.codecs.base import Codec, CodecConfig, EncodedPayload
from archive.codecs.frame import FrameHeader, decode_frame, read_frame_header
from archive.codecs.registry import LOSSLESS_STANDARD, get_codec
from archive.errors import CodecError

#: The issue's bound on the share of a series the trial may encode.
MAX_SHARE: Final[float] = 0.1
#: Pixels of the slice that ``max_encode_ms`` is quoted for.
SLICE_PIXELS: Final[int] = 512 * 512
_FAST_JXL_EFFORT: Final[int] = 3
_WARM_UP = np.arange(256, dtype=np.uint16).reshape(16, 16)  # loads each library before any clock runs


def default_candidates(max_encode_ms: float | None = None) -> tuple[dict[str, Any], ...]:
    """The registered lossless standard codecs with their default configs (jpegls, jpeg2000, htj2k, jpegxl, zstd);
    under a speed budget also JPEG-XL effort 3, the fast alternative to effort 7 (see the module docstring)."""
    configs = [get_codec({"id": codec_id}).get_config() for codec_id in LOSSLESS_STANDARD]
    if max_encode_ms is not None:
        fast_jxl = get_codec({"id": "jpegxl", "effort": _FAST_JXL_EFFORT}).get_config()
        if fast_jxl not in configs:
            configs.insert(configs.index(get_codec({"id": "jpegxl"}).get_config()) + 1, fast_jxl)
    return tuple(configs)


def _candidate_config(candidate: object) -> dict[str, Any]:
    """A candidate's canonical config (defaults filled in); CodecError when it is not a lossless codec config."""
    if not isinstance(candidate, Mapping):
        raise CodecError(f"auto candidate must be a codec config mapping, not {type(candidate).__name__}")
    if candidate.get("id") == AutoCodec.codec_id:
        raise CodecError("auto candidates cannot be 'auto' themselves")
    codec = get_codec(candidate)
    if not codec.lossless:
        raise CodecError(f"auto candidate {dict(candidate)!r} is not lossless (max_error {codec.max_error!r})")
    return codec.get_config()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class AutoConfig(CodecConfig):
    """``candidates``: codec configs (None = :func:`default_candidates`, which depend on the budget); ``sample``: share of the series tried
    (0 < sample <= 0.1); ``max_encode_ms``: budget per 512² slice-equivalent (None = no budget)."""

    candidates: tuple[dict[str, Any], ...] | None = None
    sample: float = MAX_SHARE
    max_encode_ms: float | None = None

    def __post_init__(self) -> None:
        # Canonical form: a JSON list becomes a tuple of complete configs, so equal choices compare equal.
        if self.candidates is not None:
            if isinstance(self.candidates, (str, bytes, Mapping)) or not isinstance(self.candidates, Sequence):
                raise CodecError(f"auto candidates must be a list of codec configs, got {self.candidates!r}")
            object.__setattr__(self, "candidates", tuple(_candidate_config(c) for c in self.candidates))
        super().__post_init__()

    def validate(self) -> None:
        if self.candidates is not None:
            if not self.candidates:
                raise CodecError("auto candidates must not be empty (null = the lossless standard codecs)")
            for candidate in self.candidates:
                _candidate_config(candidate)
        if not _is_number(self.sample) or not 0 < self.sample <= MAX_SHARE:
            raise CodecError(f"auto sample must be a share in (0, {MAX_SHARE}], got {self.sample!r}")
        if self.max_encode_ms is not None and (not _is_number(self.max_encode_ms) or self.max_encode_ms <= 0):
            raise CodecError(f"auto max_encode_ms must be a positive number or null, got {self.max_encode_ms!r}")

    def __hash__(self) -> int:  # the candidate dicts are not hashable; their JSON is
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))


@dataclass(frozen=True)
class CandidateResult:
    """One candidate in one trial. ``bytes``: the sample's frame containers plus the context blob, if any;
    ``projected_bytes``: the same scaled to the whole series (the ranking key); ``ok``: may win (decoded
    bit-exactly and within the speed budget); ``reason``: why not, else empty."""

    config: dict[str, Any]
    bytes: int
    projected_bytes: int
    encode_ms: float
    decode_ms: float
    encode_ms_per_slice: float
    ok: bool
    reason: str = ""
    produced_by: tuple[str, ...] = ()  # codec ids the containers name (a library that refused an input -> zstd)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["produced_by"] = list(self.produced_by)
        return out


@dataclass(frozen=True)
class Trial:
    """What the catalog records about one choice: every candidate's figures and the winner."""

    candidates: tuple[CandidateResult, ...]
    winner: dict[str, Any]
    sampled: int
    total: int
    indices: tuple[int, ...] = ()
    max_encode_ms: float | None = None
    trial_ms: float = 0.0
    note: str = ""
    pixels: int = 0  # pixels encoded per candidate
    frames: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (the catalog stores it as is)."""
        return {
            "candidates": [c.as_dict() for c in self.candidates],
            "winner": dict(self.winner),
            "sampled": self.sampled,
            "total": self.total,
            "indices": list(self.indices),
            "max_encode_ms": self.max_encode_ms,
            "trial_ms": self.trial_ms,
            "note": self.note,
            "pixels": self.pixels,
            "frames": self.frames,
        }


def sample_indices(n_instances: int, share: float = MAX_SHARE) -> list[int]:
    """Which instances of a series of ``n_instances`` (in series order) the trial encodes.

    ``floor(n * share)`` of them, capped at 10 % and at least one, each in the
    middle of its equal stretch of the series, so that a series whose content
    changes along it (a 3-plane localizer, a field map's echoes) is seen
    everywhere. Deterministic: the same series always gives the same sample.
    """
    if type(n_instances) is not int or n_instances < 1:
        raise CodecError(f"a series to sample needs at least one instance, got {n_instances!r}")
    if not _is_number(share) or not 0 < share <= MAX_SHARE:
        raise CodecError(f"sample share must be in (0, {MAX_SHARE}], got {share!r}")
    count = max(1, math.floor(n_instances * share + 1e-9))
    return [((2 * i + 1) * n_instances) // (2 * count) for i in range(count)]


@dataclass
class _Tried:
    result: CandidateResult
    frames: list[bytes]
    context: bytes | None


def _try(
    candidate: Codec, frames: Sequence[Pixels], total_share: float, budget: float | None, fit: bool,
    keep: bool,
) -> _Tried:
    """Encode ``frames`` with one candidate, decode and compare each, time both."""
    config = candidate.get_config()
    context: bytes | None = None
    pixels = sum(int(f.size) for f in frames)
    try:
        # untimed: the first call of a library loads it; a candidate that refuses this frame is judged on the real ones
        with contextlib.suppress(Exception):
            decode_frame(candidate.encode(_WARM_UP))
        started = time.perf_counter()
        if fit:
            context = candidate.fit(frames)
        blobs = [candidate.encode(frame, context) for frame in frames]
        encode_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        decoded = [decode_frame(blob, context) for blob in blobs]
        decode_ms = (time.perf_counter() - started) * 1e3
    except Exception as exc:  # noqa: BLE001 - any failure disqualifies the candidate, it never stops the trial
        result = CandidateResult(config, 0, 0, 0.0, 0.0, 0.0, False, f"failed: {type(exc).__name__}: {exc}")
        return _Tried(result, [], None)
    produced = sorted({read_frame_header(blob).codec_id for blob in blobs})
    size = sum(len(b) for b in blobs) + (len(context) if context else 0)
    projected = round(sum(len(b) for b in blobs) * total_share) + (len(context) if context else 0)
    per_slice = encode_ms * SLICE_PIXELS / max(pixels, 1)
    reason = ""
    bad = sum(1 for frame, out in zip(frames, decoded) if out.dtype != frame.dtype or not np.array_equal(out, frame))
    if bad:
        reason = f"{bad} of {len(frames)} frames did not decode bit-exactly"
    elif budget is not None and per_slice > budget:
        reason = f"over the speed budget: {per_slice:.1f} ms per 512² slice > {budget:g}"
    result = CandidateResult(config, size, projected, round(encode_ms, 3), round(decode_ms, 3),
                             round(per_slice, 3), not reason, reason, tuple(produced))
    return _Tried(result, blobs if keep else [], context)


def _pick(tried: Sequence[_Tried]) -> tuple[int, str]:
    """Index of the winner: the smallest eligible (ties: the first listed); failing that, the fastest that
    round-trips (every candidate over the budget); failing that, CodecError."""
    eligible = [i for i, t in enumerate(tried) if t.result.ok]
    if eligible:
        return min(eligible, key=lambda i: (tried[i].result.projected_bytes, i)), ""
    exact = [i for i, t in enumerate(tried) if t.result.reason.startswith("over the speed budget")]
    if exact:
        best = min(exact, key=lambda i: (tried[i].result.encode_ms_per_slice, i))
        return best, "every candidate was over the speed budget: the fastest was chosen"
    reasons = "; ".join(f"{t.result.config['id']}: {t.result.reason}" for t in tried)
    raise CodecError(f"no auto candidate encoded the sample losslessly ({reasons})")


def _evaluate(
    codec: AutoCodec, frames: Sequence[Pixels], *, total_share: float, fit: bool, keep: bool,
) -> tuple[list[_Tried], int, str, float]:
    started = time.perf_counter()
    arrays = [validate_pixels(f) for f in frames]
    if not arrays:
        raise CodecError("the auto trial needs at least one frame")
    budget = codec.config.max_encode_ms
    tried = [_try(c, arrays, total_share, budget, fit, keep) for c in codec.candidate_codecs()]
    winner, note = _pick(tried)
    return tried, winner, note, (time.perf_counter() - started) * 1e3


def run_trial(codec: AutoCodec, frames_by_instance: Sequence[Sequence[Pixels]]) -> Trial:
    """Try every candidate on the sampled instances of a series (all its instances, in series order).

    Only the sampled entries of ``frames_by_instance`` are read, so a lazy
    sequence that loads an instance on ``__getitem__`` keeps the rest unread.
    A candidate with shared side information (``fit``) is fitted on the sample
    and its context blob counted in its bytes. The ranking uses the sample's
    bytes scaled to the whole series.
    """
    total = len(frames_by_instance)
    indices = sample_indices(total, codec.config.sample)
    frames = [frame for i in indices for frame in frames_by_instance[i]]
    tried, winner, note, trial_ms = _evaluate(codec, frames, total_share=total / len(indices), fit=True, keep=False)
    return Trial(
        candidates=tuple(t.result for t in tried),
        winner=tried[winner].result.config,
        sampled=len(indices),
        total=total,
        indices=tuple(indices),
        max_encode_ms=codec.config.max_encode_ms,
        trial_ms=round(trial_ms, 3),
        note=note,
        pixels=sum(int(f.size) for f in frames),
        frames=len(frames),
    )


class AutoCodec(Codec):
    """Chooses, per series, the smallest lossless candidate; never labels a frame "auto"."""

    codec_id: ClassVar[str] = "auto"
    config_class: ClassVar[type[CodecConfig]] = AutoConfig
    __slots__ = ()

    @property
    def config(self) -> AutoConfig:
        return cast(AutoConfig, self._config)

    @property
    def max_error(self) -> int | None:
        return 0  # every candidate is lossless (checked when the config is built)

    def candidate_codecs(self) -> list[Codec]:
        """The candidates as codecs, in trial order."""
        configs = self.config.candidates
        if configs is None:
            configs = default_candidates(self.config.max_encode_ms)
        return [get_codec(c) for c in configs]

    def choose(self, frames_by_instance: Sequence[Sequence[Pixels]]) -> tuple[Codec, Trial]:
        """The codec to store the whole series with, and the trial that chose it (see :func:`run_trial`)."""
        trial = run_trial(self, frames_by_instance)
        return get_codec(trial.winner), trial

    def encode_with_stats(self, pixels: Pixels, context: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
        """One frame alone: every candidate on it, the smallest kept; stats hold that one-frame trial."""
        if context is not None:
            raise CodecError("auto takes no context: it fits nothing itself")
        tried, winner, note, trial_ms = _evaluate(self, [pixels], total_share=1.0, fit=False, keep=True)
        trial = Trial(
            candidates=tuple(t.result for t in tried),
            winner=tried[winner].result.config,
            sampled=1,
            total=1,
            indices=(0,),
            max_encode_ms=self.config.max_encode_ms,
            trial_ms=round(trial_ms, 3),
            note=note,
            pixels=int(np.asarray(pixels).size),
            frames=1,
        )
        return tried[winner].frames[0], {"auto": trial.as_dict()}

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        raise CodecError("auto encodes through its winner (encode_with_stats); it has no payload of its own")

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        raise CodecError("no frame is labelled 'auto': a frame names the codec that produced it")
