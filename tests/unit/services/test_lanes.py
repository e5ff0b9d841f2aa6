"""Job tasks whose codec runs a learned model are sent on the learned lane (a queue of its own)."""

from __future__ import annotations

from typing import Any

import pytest

from archive.codecs import uses_learned_codec
from archive.config import Settings
from archive.kinds import JobKind, Lane
from archive.services.jobs import ItemSpec, create_job, dispatch
from archive.services.runtime import Archive


@pytest.mark.parametrize(("config", "learned"), [
    ({"id": "jpegls"}, False),
    ({"id": "learned", "max_error": 2}, True),
    ({"id": "gan", "bpp": 0.1}, True),
    ({"id": "bounded", "max_error": 2, "inner": {"id": "pca"}}, False),
    ({"id": "bounded", "max_error": 2, "inner": {"id": "learned"}}, True),
    ({"id": "auto", "candidates": [{"id": "jpegls"}, {"id": "learned"}]}, True),
    ({"id": "auto"}, False),
])
def test_a_codec_config_runs_a_model_as_itself_an_inner_or_a_candidate(config: dict[str, Any], learned: bool) -> None:
    assert uses_learned_codec(config) is learned


def _job(archive: Archive, kind: JobKind, params: dict[str, Any] | None) -> list[int]:
    with archive.unit_of_work() as uow:
        job = create_job(uow.session, kind=kind, items=[ItemSpec(path=f"/in/{kind.value}.dcm")], chunk_size=8,
                         params=params)
        uow.commit()
        return sorted(t.id for t in job.tasks)


def _lanes_sent(archive: Archive, task_ids: list[int]) -> list[Lane]:
    sent: list[Lane] = []

    def dispatcher(task_id: int, lane: Lane) -> str:
        sent.append(lane)
        return f"message-{task_id}"

    assert dispatch(archive, task_ids, dispatcher) == len(task_ids)
    return sent


def test_recompression_to_a_learned_codec_goes_to_the_learned_lane(sqlite_archive: Archive) -> None:
    to_learned = _job(sqlite_archive, JobKind.RECOMPRESS, {"codec": {"id": "learned", "max_error": 0}})
    to_jpegxl = _job(sqlite_archive, JobKind.RECOMPRESS, {"codec": {"id": "jpegxl", "effort": 7}})
    ingest = _job(sqlite_archive, JobKind.INGEST, None)
    assert _lanes_sent(sqlite_archive, to_learned) == [Lane.LEARNED]
    assert _lanes_sent(sqlite_archive, to_jpegxl + ingest) == [Lane.DEFAULT, Lane.DEFAULT]


def test_ingest_goes_to_the_learned_lane_when_the_archive_codec_is_learned(tmp_path: Any) -> None:
    settings = Settings.load(environ={}, home=tmp_path / "home", normalize=False, codec={"id": "learned"})
    archive = Archive.open(settings)
    try:
        assert _lanes_sent(archive, _job(archive, JobKind.INGEST, None)) == [Lane.LEARNED]
    finally:
        archive.close()


def test_each_lane_has_a_queue_of_its_own() -> None:
    from workers.app import create_app

    settings = Settings.load(environ={"MEDARCHIVE_LEARNED_QUEUE": "gpu-box"})
    app = create_app(settings)
    assert app.conf.task_default_queue == settings.queue
    assert app.conf.medarchive_learned_queue == "gpu-box"
