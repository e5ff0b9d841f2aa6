"""``/health`` and ``/metrics`` on the real served archive (and one broken archive)."""

from __future__ import annotations

import shutil

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from archive.config import Settings
from archive.services import monitoring
from archive.services.runtime import Archive
from tests.integration.api.conftest import TOKEN, Served, serve


def test_health_is_open_and_says_what_it_checked(served: Served) -> None:
    answer = httpx.get(f"{served.url}/health", timeout=30)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "catalog": "ok", "store": "ok"}


def test_metrics_parse_as_prometheus_text_with_the_archive_and_request_families(served: Served) -> None:
    monitoring.record_verify(served.archive, blobs_checked=12, missing=1, corrupt=2)
    with httpx.Client(base_url=served.url, headers=served.headers, timeout=30) as client:
        client.get("/health")
        client.get("/no/such/route")
        answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    assert {"medarchive_catalog_up", "medarchive_queue_items", "medarchive_jobs", "medarchive_quarantine_entries",
            "medarchive_free_disk_bytes", "medarchive_verify_failures", "medarchive_verify_last_run_timestamp_seconds",
            "medarchive_http_request_duration_seconds", "medarchive_http_requests"} <= set(families)

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in families[name].samples if s.name == name and labels.items() <= s.labels.items())

    assert value("medarchive_catalog_up") == 1
    assert value("medarchive_free_disk_bytes") > 0
    assert value("medarchive_verify_failures", kind="missing") == 1
    assert value("medarchive_verify_failures", kind="corrupt") == 2
    assert value("medarchive_jobs", status="done") >= 1  # the fixture's ingest
    assert value("medarchive_queue_items", status="queued") >= 0
    assert value("medarchive_quarantine_entries") == monitoring.quarantine_entries(served.archive)
    requests = families["medarchive_http_requests"].samples
    assert any(s.labels == {"route": "/health", "method": "GET", "status": "200"} for s in requests)
    assert any(s.labels["route"] == "(unmatched)" and s.labels["status"] == "404" for s in requests)
    assert not any("no/such" in s.labels["route"] for s in requests)  # templates, not paths: bounded labels
    latency = families["medarchive_http_request_duration_seconds"].samples
    assert any(s.name.endswith("_count") and s.labels == {"route": "/health", "method": "GET"} and s.value >= 1
               for s in latency)


def test_health_answers_503_when_the_store_is_unusable(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = Settings.load(environ={}, home=tmp_path_factory.mktemp("broken") / "home", normalize=False,
                             api_tokens={"tests": TOKEN})
    archive = Archive.open(settings, migrate=True)
    url, server = serve(archive)
    try:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # no blob yet: the home is writable
        archive.store.root.mkdir(parents=True, exist_ok=True)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        shutil.rmtree(archive.store.root)
        archive.store.root.write_bytes(b"")  # something else where the blobs belong
        answer = httpx.get(f"{url}/health", timeout=30)
        assert answer.status_code == 503
        assert answer.json()["store"].startswith("unavailable") and answer.json()["catalog"] == "ok"
        assert str(settings.home) not in answer.text  # public: no paths
    finally:
        server.stop()
        archive.close()
