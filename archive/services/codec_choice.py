"""Use case: the codec ``auto`` chooses for a series, tried once on a sample and recorded in the catalog.

When the archive's codec is ``{"id": "auto", ...}``, the first batch of a
series a stager sees runs the trial (:func:`archive.codecs.auto.run_trial`)
on a sample of the instances in that batch (at most 10 %, at least one),
records it as a :class:`~archive.catalog.models.CodecTrial` row, and the
whole series is stored with the winner. Later batches, in this process or
another, read the recorded choice. Two stagers that try the same series at
the same moment both record a trial; the first recorded one wins from then on.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select

from archive.catalog.models import CodecTrial
from archive.codecs import Codec, get_codec
from archive.services.runtime import Archive

_lock = threading.Lock()
_chosen: dict[tuple[str, str], dict[str, Any]] = {}  # (series UID, auto config JSON) -> winner config
_MAX_REMEMBERED = 10_000


def series_codecs(archive: Archive, codec: Codec, series: Sequence[tuple[str, Sequence[np.ndarray]]]
                  ) -> dict[str, Codec]:
    """The codec each series of a batch is stored with; ``series`` is (series UID, frames of one instance).

    For any codec but ``auto`` this is that codec for every series.
    """
    if codec.codec_id != "auto":
        return {uid: codec for uid, _ in series}
    from archive.codecs.auto import AutoCodec

    assert isinstance(codec, AutoCodec)
    key = json.dumps(codec.get_config(), sort_keys=True)
    by_series: dict[str, list[Sequence[np.ndarray]]] = {}
    for uid, frames in series:
        by_series.setdefault(uid, []).append(frames)
    result: dict[str, Codec] = {}
    for uid, instances in by_series.items():
        winner = _chosen.get((uid, key)) or _recorded(archive, uid, codec.get_config())
        if winner is None:
            chosen, trial = codec.choose(instances)
            winner = chosen.get_config()
            winner = _record(archive, uid, codec.get_config(), winner, trial.as_dict(), trial.sampled)
        with _lock:
            if len(_chosen) >= _MAX_REMEMBERED:
                _chosen.clear()
            _chosen[(uid, key)] = winner
        result[uid] = get_codec(winner)
    return result


def _recorded(archive: Archive, series_uid: str, config: dict[str, Any]) -> dict[str, Any] | None:
    with archive.unit_of_work() as uow:
        for row in uow.session.scalars(select(CodecTrial).where(CodecTrial.series_uid == series_uid)
                                       .order_by(CodecTrial.id)):
            if row.config == config:
                return dict(row.winner)
    return None


def _record(archive: Archive, series_uid: str, config: dict[str, Any], winner: dict[str, Any],
            result: dict[str, Any], sampled: int) -> dict[str, Any]:
    """Record a trial; returns the winner recorded first for this series (this one, unless another was faster)."""
    with archive.unit_of_work() as uow:
        uow.session.add(CodecTrial(series_uid=series_uid, config=config, winner=winner, result=result,
                                   sampled=sampled))
        uow.commit()
    return _recorded(archive, series_uid, config) or winner


def trials_of(archive: Archive, series_uid: str) -> list[dict[str, Any]]:
    """Every trial recorded for a series, oldest first (``show`` and the tests read them)."""
    with archive.unit_of_work() as uow:
        return [{"config": row.config, "winner": row.winner, "result": row.result, "sampled": row.sampled,
                 "created_at": row.created_at.isoformat()}
                for row in uow.session.scalars(select(CodecTrial).where(CodecTrial.series_uid == series_uid)
                                               .order_by(CodecTrial.id))]
