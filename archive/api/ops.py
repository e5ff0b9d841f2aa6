"""Operations: ``/health`` (open, for load balancers and orchestrators) and ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from archive.api.deps import archive_of
from archive.services import monitoring
from archive.services.runtime import Archive

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiMetrics:
    """One registry per app (several apps in one process, as in the tests, never share counters)."""

    def __init__(self, archive: Archive) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("medarchive_http_request_duration_seconds",
                                 "Time from request to the last byte of the answer, by route template and method.",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("medarchive_http_requests", "Answers by route template, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.registry.register(CatalogCollector(archive))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.latency.labels(route, method).observe(seconds)
        self.requests.labels(route, method, str(status)).inc()


class CatalogCollector(Collector):
    """The archive's figures, read from the catalog and the home at each scrape (:mod:`archive.services.monitoring`)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def describe(self) -> Iterable[Metric]:
        return []  # read only at scrape time: registering must not query the catalog

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("medarchive_catalog_up", "1 when the catalog answered this scrape.")
        try:
            queue = monitoring.queue_depth(self.archive)
            jobs = monitoring.jobs_by_status(self.archive)
            quarantined = monitoring.quarantine_entries(self.archive)
        except Exception as exc:  # noqa: BLE001  (a scrape must answer even when the catalog does not)
            log.warning("metrics: the catalog did not answer (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            family = GaugeMetricFamily("medarchive_queue_items", "Job items waiting for a worker or being worked on.",
                                       labels=["status"])
            for status, count in queue.items():
                family.add_metric([status.value], count)
            yield family
            family = GaugeMetricFamily("medarchive_jobs", "Jobs by status.", labels=["status"])
            for job_status, count in jobs.items():
                family.add_metric([job_status.value], count)
            yield family
            yield GaugeMetricFamily("medarchive_quarantine_entries", "Files set aside with a reason (quarantine).",
                                    value=quarantined)
        try:
            yield GaugeMetricFamily("medarchive_free_disk_bytes", "Free bytes on the file system of the home.",
                                    value=monitoring.free_disk_bytes(self.archive))
        except OSError:
            pass
        verify = monitoring.last_verify(self.archive)
        if verify is not None:  # no verify recorded yet: no figure rather than a made-up zero
            family = GaugeMetricFamily("medarchive_verify_failures",
                                       "Blobs the last recorded verify found missing or corrupt.", labels=["kind"])
            family.add_metric(["missing"], verify.missing)
            family.add_metric(["corrupt"], verify.corrupt)
            yield family
            yield GaugeMetricFamily("medarchive_verify_blobs_checked", "Blobs the last recorded verify re-hashed.",
                                    value=verify.blobs_checked)
            yield GaugeMetricFamily("medarchive_verify_last_run_timestamp_seconds",
                                    "When the last recorded verify finished (Unix time).",
                                    value=verify.finished_at.timestamp())


@router.get("/health", responses={200: {"description": "catalog and store usable"},
                                  503: {"description": "the catalog or the store is not usable (which, in the body)"}})
def health(request: Request) -> JSONResponse:
    """Open to anyone: a trivial catalog query and a look at the store's folder; no data, no paths."""
    result = monitoring.check_health(archive_of(request))
    return JSONResponse(result.as_dict(), status_code=200 if result.ok else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
def metrics(request: Request) -> Response:
    """Queue depth, jobs, quarantine, free disk, verify failures, request latencies and statuses."""
    api_metrics: ApiMetrics = request.app.state.metrics
    return Response(generate_latest(api_metrics.registry), media_type=CONTENT_TYPE_LATEST)
