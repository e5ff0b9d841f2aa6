"""``medarchive bench serve``: medarchive's DICOMweb server next to Orthanc's, same requests, same run.

One run on the shared data (all of ``ct-chest-tcia`` and the ``mr-*`` folders;
``quick``: one CT patient and one MR series):

1. a fresh home in a temporary folder (embedded SQLite, codec JPEG-LS,
   normalization off: both archives then hold the same instances), the data
   ingested, and the server started as a child process on a free loopback port
   with ``MEDARCHIVE_API_TOKEN`` set (``medarchive serve`` where the command
   exists, else uvicorn on ``archive.api.app:app_from_environment``);
2. when installed, a private Orthanc loaded with the same files, transcoded to
   JPEG-LS Lossless first (:mod:`archive.bench_serve_orthanc`);
3. QIDO-RS latency (one client, sequential requests) for four searches, on the
   data set's catalog, both servers; then, with ``studies`` generated studies
   added to medarchive's catalog (bulk-inserted Study and Series rows) and the
   server restarted, the same kinds of searches, plain and paged
   (``limit=100``), on medarchive alone;
4. WADO-RS of one lossless CT study (three 512x512 instances) as Explicit VR
   Little Endian and with ``transfer-syntax=*``, with 1 and 8 client threads
   (one httpx Client each, keep-alive) fetching it repeatedly for ``seconds``.

Each figure is measured in two alternated rounds per server (medarchive, Orthanc,
Orthanc, medarchive) so both share the machine's noise, after a warm-up. Every
answer is checked (status, JSON list or multipart part count and size); the first
answer of each server and syntax is checked in depth (each part parsed, its
transfer syntax read, its pixels compared with the source file's). A failed check
is counted and never timed as a success. Requests send ``Accept-Encoding:
identity``. MB = 10^6 bytes of the multipart body.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import platform
import random
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
import numpy as np
import pydicom
import sqlalchemy as sa

import archive
from archive.bench import cpu_model
from archive.bench_serve_orthanc import (
    Orthanc,
    ServerProcess,
    free_port,
    load_orthanc,
    orthanc_missing,
    orthanc_version,
)
from archive.catalog.models import Series, Study
from archive.config import Settings
from archive.errors import ArchiveError
from archive.services.discovery import discover
from archive.services.ingest import default_jobs, ingest_paths
from archive.services.outcomes import Outcome
from archive.services.runtime import Archive

MB: Final[float] = 1e6
CODEC_CONFIG: Final[dict[str, Any]] = {"id": "jpegls"}
EXPLICIT_LE: Final[str] = "1.2.840.10008.1.2.1"
SYNTAXES: Final[tuple[str, ...]] = (EXPLICIT_LE, "*")
CLIENTS: Final[tuple[int, ...]] = (1, 8)
ROUNDS: Final[int] = 2
PAGE: Final[int] = 100
MEDARCHIVE: Final[str] = "medarchive"
ORTHANC: Final[str] = "orthanc"
FULL_FOLDERS: Final[tuple[str, ...]] = ("ct-chest-tcia", "mr-ge-signa", "mr-philips-achieva", "mr-siemens-prisma")
QUICK_FOLDERS: Final[tuple[str, ...]] = ("ct-chest-tcia/A002304", "mr-siemens-prisma")
QIDO_GOAL_MS: Final[float] = 20.0


def default_data() -> Path:
    """``$MEDARCHIVE_SHARED_DATA``, else ``shared/data`` beside the repository (as the tests find it)."""
    env = os.environ.get("MEDARCHIVE_SHARED_DATA")
    return Path(env) if env else Path(archive.__file__).resolve().parents[2] / "shared" / "data"


# --- what the data holds ------------------------------------------------------------------------------------------


@dataclass
class StudyFacts:
    """The attributes the searches match on, read from the source headers: the expected answers."""

    uid: str
    patient_id: str
    patient_name: str
    date: str
    modalities: set[str] = field(default_factory=set)
    files: list[Path] = field(default_factory=list)
    matrices: set[tuple[int, int]] = field(default_factory=set)


def describe_sources(files: Sequence[Path]) -> dict[str, StudyFacts]:
    """Study -> its facts, from every file pydicom reads (headers only)."""
    studies: dict[str, StudyFacts] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001  (not DICOM: neither server will hold it)
            continue
        uid = str(ds.get("StudyInstanceUID", ""))
        if not uid:
            continue
        facts = studies.setdefault(uid, StudyFacts(uid, str(ds.get("PatientID", "")), str(ds.get("PatientName", "")),
                                                    str(ds.get("StudyDate", ""))))
        facts.modalities.add(str(ds.get("Modality", "")))
        facts.files.append(path)
        facts.matrices.add((int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)))
    return studies


def pick_wado_study(studies: dict[str, StudyFacts]) -> StudyFacts:
    """The first CT study (by UID) of three 512x512 instances, as ANCHORS' Orthanc figure; else the largest CT study."""
    ct = sorted((s for s in studies.values() if "CT" in s.modalities), key=lambda s: s.uid)
    if not ct:
        raise ArchiveError("bench serve needs a CT study in the data (ct-chest-tcia)")
    for study in ct:
        if len(study.files) == 3 and study.matrices == {(512, 512)}:
            return study
    return max(ct, key=lambda s: len(s.files))


@dataclass(frozen=True)
class Query:
    """One QIDO-RS search: its query string and how many studies it must find."""

    catalog: str
    text: str
    expected: int

    def matches(self, facts: tuple[str, str, str, set[str]]) -> bool:
        patient_id, name, date, modalities = facts
        key, _, value = self.text.split("&")[0].partition("=")
        if key == "PatientID":
            return patient_id == value
        if key == "PatientName":
            return name.upper().startswith(value.rstrip("*").upper())
        if key == "StudyDate":
            start, _, end = value.partition("-")
            return bool(date) and start <= date <= end
        return value in modalities


def searches(catalog: str, example: StudyFacts, date_range: str, letter: str,
             rows: Sequence[tuple[str, str, str, set[str]]], page: int | None = None) -> list[Query]:
    """The four searches (PatientID, PatientName prefix, StudyDate range, ModalitiesInStudy), expected counts set."""
    texts = [f"PatientID={example.patient_id}", f"PatientName={letter}*", f"StudyDate={date_range}",
             "ModalitiesInStudy=CT"]
    queries = []
    for text in texts:
        probe = Query(catalog, text, 0)
        expected = sum(1 for row in rows if probe.matches(row))
        if page is not None:
            text, expected = f"{text}&limit={page}", min(expected, page)
        queries.append(Query(catalog, text, expected))
    return queries


# --- medarchive: home, generated catalog, server ---------------------------------------------------------------


def _settings(home: Path, token: str) -> Settings:
    return Settings.load(environ={}, home=home, normalize=False, api_tokens={"bench": token},
                         codec=dict(CODEC_CONFIG))


def ingest_home(home: Path, paths: Sequence[Path], token: str) -> dict[str, Any]:
    """A fresh home holding ``paths``, ingested as ``medarchive ingest`` does (one process per core)."""
    archive_ = Archive.open(_settings(home, token))
    try:
        started = time.perf_counter()
        report = ingest_paths(archive_, list(paths), codec_config=dict(CODEC_CONFIG), jobs=default_jobs())
        seconds = time.perf_counter() - started
    finally:
        archive_.close()
    return {"instances": report.instances, "studies": len(report.studies), "bytes_in": report.bytes_in,
            "bytes_stored": report.bytes_stored, "seconds": seconds,
            "outcomes": {o.value: report.count(o) for o in Outcome}}


_LAST = ("Adams", "Alvarez", "Anders", "Baker", "Bernard", "Chen", "Costa", "Dubois", "Evans", "Fischer", "Garcia",
         "Hansen", "Ito", "Jensen", "Kim", "Larsen", "Martin", "Nguyen", "Olsen", "Petit", "Quinn", "Rossi", "Silva",
         "Tanaka", "Ueda", "Vidal", "Weber", "Xu", "Young", "Zhang")
_FIRST = ("Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Lea", "Marc", "Nora",
          "Omar", "Paul", "Rosa", "Sam", "Tom", "Una", "Yves")
_MODALITIES = ("CT", "CT", "CT", "MR", "MR", "CR", "DX", "US", "MG", "PT")
_DESCRIPTIONS = ("CHEST", "ABDOMEN", "HEAD", "KNEE", "SPINE", "PELVIS")


def generated_rows(count: int, seed: int = 18) -> list[dict[str, Any]]:
    """``count`` plausible studies: names from 600 combinations, two to three studies per patient, dates
    1990-2024, one series each with a modality drawn from a CT/MR-heavy mix. Deterministic."""
    rng = random.Random(seed)
    rows = []
    patients = max(count // 2, 1)
    for index in range(count):
        patient = rng.randrange(patients)
        prng = random.Random(patient * 7919 + seed)
        name = f"{prng.choice(_LAST)}^{prng.choice(_FIRST)}"
        date = f"{rng.randint(1990, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        modality = rng.choice(_MODALITIES)
        rows.append({
            "study_uid": f"2.25.{rng.getrandbits(120)}", "patient_id": f"GEN{patient:06d}", "patient_name": name,
            "study_date": date, "study_time": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
            "accession_number": f"ACC{index:08d}", "study_description": f"{modality} {rng.choice(_DESCRIPTIONS)}",
            "modalities_in_study": modality,
            "patient_birth_date": f"{rng.randint(1930, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            "patient_sex": rng.choice(("F", "M")), "referring_physician_name": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}",
            "dicom_study_id": str(index), "specific_character_set": "ISO_IR 100", "num_series": 1,
            "num_instances": rng.randint(1, 400), "series_uid": f"2.25.{rng.getrandbits(120)}", "modality": modality,
        })
    return rows


def add_generated_studies(home: Path, token: str, rows: Sequence[dict[str, Any]]) -> float:
    """Bulk-insert ``rows`` as Study rows with one Series each (what the searches join on); seconds taken."""
    study_columns = {c.name for c in Study.__table__.columns}
    archive_ = Archive.open(_settings(home, token))
    try:
        started = time.perf_counter()
        with archive_.engine.begin() as connection:
            first = (connection.scalar(sa.select(sa.func.max(Study.id))) or 0) + 1
            studies = [{"id": first + i, **{k: v for k, v in row.items() if k in study_columns}}
                       for i, row in enumerate(rows)]
            series = [{"study_id": first + i, "series_uid": row["series_uid"], "modality": row["modality"],
                       "series_number": 1, "series_description": row["study_description"],
                       "num_instances": row["num_instances"]} for i, row in enumerate(rows)]
            for start in range(0, len(rows), 2000):
                connection.execute(sa.insert(Study), studies[start:start + 2000])
                connection.execute(sa.insert(Series), series[start:start + 2000])
        return time.perf_counter() - started
    finally:
        archive_.close()


def serve_launcher() -> str:
    """How the server is started (recorded in the result)."""
    return "medarchive serve"


def medarchive_server(home: Path, token: str, launcher: str, log: Path) -> tuple[ServerProcess, str]:
    """The server over ``home`` as a child process (not started yet) and its URL."""
    port = free_port()
    command = [sys.executable, "-m", "archive.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    repo = str(Path(archive.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), MEDARCHIVE_API_TOKEN=token, MEDARCHIVE_NORMALIZE="off",
               PYTHONPATH=os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p))
    url = f"http://127.0.0.1:{port}"
    return ServerProcess("medarchive server", command, env=env, log=log, ready_url=f"{url}/health"), url


# --- the client ---------------------------------------------------------------------------------------------------


class CheckFailed(Exception):
    """An answer that is not what was asked for: counted, never timed."""


@dataclass
class Target:
    """One server under test: its DICOMweb root and the headers every request carries."""

    name: str
    root: str
    headers: dict[str, str]
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, index: int) -> httpx.Client:
        while len(self.clients) <= index:
            self.clients.append(httpx.Client(timeout=120.0, headers={"Accept-Encoding": "identity",
                                                                     **self.headers}))
        return self.clients[index]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


def _stats(samples_ms: Sequence[float]) -> tuple[float | None, float | None]:
    if not samples_ms:
        return None, None
    return float(np.median(samples_ms)), float(np.percentile(samples_ms, 95))


def qido_once(client: httpx.Client, url: str, expected: int) -> tuple[float, int, bool]:
    """(ms, studies found, truncated); raises :class:`CheckFailed` on an error or a wrong count."""
    started = time.perf_counter()
    answer = client.get(url, headers={"Accept": "application/dicom+json"})
    body = answer.content
    ms = (time.perf_counter() - started) * 1000
    if answer.status_code == 204:
        found = 0
    elif answer.status_code != 200:
        raise CheckFailed(f"HTTP {answer.status_code}: {body[:200]!r}")
    else:
        try:
            parsed = answer.json()
        except ValueError as exc:
            raise CheckFailed(f"not JSON: {body[:200]!r}") from exc
        if not isinstance(parsed, list):
            raise CheckFailed(f"not a JSON list: {body[:200]!r}")
        found = len(parsed)
    if found > expected or (found == 0 and expected > 0):
        raise CheckFailed(f"{found} studies found, {expected} expected")
    return ms, found, found < expected


@dataclass
class Tally:
    """What one server did for one figure, over all its rounds."""

    ms: list[float] = field(default_factory=list)
    bytes: int = 0
    answers: int = 0
    failures: int = 0
    first_failure: str = ""
    seconds: float = 0.0
    found: int = 0
    truncated: bool = False

    def fail(self, message: str) -> None:
        self.failures += 1
        self.first_failure = self.first_failure or message


def qido_url(target: Target, query: Query) -> str:
    """``*`` and ``?`` sent as they are: Orthanc does not match ``%2A`` as a wildcard."""
    return f"{target.root}/studies?{quote(query.text, safe='=&*?-^')}"


def qido_round(target: Target, query: Query, seconds: float, tally: Tally, min_requests: int = 10) -> None:
    client = target.client(0)
    url = qido_url(target, query)
    deadline = time.perf_counter() + seconds
    done = 0
    while done < min_requests or time.perf_counter() < deadline:
        done += 1
        try:
            ms, found, truncated = qido_once(client, url, query.expected)
        except (CheckFailed, httpx.HTTPError) as exc:
            tally.fail(str(exc))
            if tally.failures >= 3 and not tally.answers:
                return
            continue
        tally.ms.append(ms)
        tally.answers += 1
        tally.found, tally.truncated = found, truncated


def accept_for(syntax: str) -> str:
    return f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip().strip('"').encode()
    raise CheckFailed(f"no boundary in Content-Type {content_type!r}")


def split_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related body: (Content-Type, content)."""
    delimiter = b"--" + _boundary(content_type)
    parts = []
    for piece in body.split(delimiter)[1:]:
        if piece.startswith(b"--"):
            break
        head, _, content = piece.lstrip(b"\r\n").partition(b"\r\n\r\n")
        kind = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                kind = value.strip()
        parts.append((kind, content[:-2] if content.endswith(b"\r\n") else content))
    return parts


@dataclass(frozen=True)
class Reference:
    """What a good answer for one server and syntax looks like, from the checked first answer."""

    parts: int
    size: int
    transfer_syntaxes: tuple[str, ...]


def check_study_answer(answer: httpx.Response, study: StudyFacts, syntax: str,
                       pixels: dict[str, np.ndarray]) -> Reference:
    """Every part parsed: a DICOM file of the study, in the asked syntax, pixels equal to the source's."""
    if answer.status_code != 200:
        raise CheckFailed(f"HTTP {answer.status_code}: {answer.content[:200]!r}")
    parts = split_multipart(answer.content, answer.headers.get("content-type", ""))
    if len(parts) != len(study.files):
        raise CheckFailed(f"{len(parts)} parts, {len(study.files)} instances in the study")
    seen: list[str] = []
    for kind, content in parts:
        if not kind.lower().startswith("application/dicom"):
            raise CheckFailed(f"a part of type {kind!r}")
        ds = pydicom.dcmread(io.BytesIO(content))
        ts = str(ds.file_meta.TransferSyntaxUID)
        if syntax != "*" and ts != syntax:
            raise CheckFailed(f"a part in {ts}, {syntax} asked")
        source = pixels.get(str(ds.SOPInstanceUID))
        if source is None:
            raise CheckFailed(f"instance {ds.SOPInstanceUID} is not one of the study's source files")
        if not np.array_equal(ds.pixel_array, source):
            raise CheckFailed(f"instance {ds.SOPInstanceUID}: pixels differ from the source file's")
        seen.append(ts)
    return Reference(len(parts), len(answer.content), tuple(sorted(set(seen))))


def fetch_study(client: httpx.Client, url: str, accept: str, reference: Reference) -> tuple[float, int]:
    """(ms, bytes) of one retrieval, checked against ``reference`` (status, part count, size within 1 kB)."""
    started = time.perf_counter()
    answer = client.get(url, headers={"Accept": accept})
    body = answer.content
    ms = (time.perf_counter() - started) * 1000
    if answer.status_code != 200:
        raise CheckFailed(f"HTTP {answer.status_code}: {body[:200]!r}")
    parts = body.count(b"--" + _boundary(answer.headers.get("content-type", ""))) - 1
    if parts != reference.parts or abs(len(body) - reference.size) > 1024:
        raise CheckFailed(f"{parts} parts of {len(body)} bytes, {reference.parts} parts of ~{reference.size} expected")
    return ms, len(body)


def wado_round(target: Target, url: str, accept: str, reference: Reference, clients: int, seconds: float,
               tally: Tally) -> None:
    """``clients`` threads, each with its own Client, fetching the study until ``seconds`` have passed."""
    results: list[Tally] = [Tally() for _ in range(clients)]
    ends = [0.0] * clients
    gate = threading.Barrier(clients + 1)
    start_box: list[float] = []

    def work(index: int) -> None:
        client = target.client(index)
        gate.wait()
        deadline = start_box[0] + seconds
        mine = results[index]
        while True:
            try:
                ms, size = fetch_study(client, url, accept, reference)
                mine.ms.append(ms)
                mine.bytes += size
                mine.answers += 1
            except (CheckFailed, httpx.HTTPError) as exc:
                mine.fail(str(exc))
            if time.perf_counter() >= deadline:
                break
        ends[index] = time.perf_counter()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start_box.append(time.perf_counter())
    gate.wait()
    for thread in threads:
        thread.join()
    tally.seconds += max(ends) - start_box[0]
    for one in results:
        tally.ms.extend(one.ms)
        tally.bytes += one.bytes
        tally.answers += one.answers
        tally.failures += one.failures
        tally.first_failure = tally.first_failure or one.first_failure


def _alternated(targets: Sequence[Target]) -> tuple[list[Target], int]:
    """medarchive, Orthanc, Orthanc, medarchive: each server goes first as often as last; one round when alone."""
    rounds = ROUNDS if len(targets) > 1 else 1
    order: list[Target] = []
    for round_ in range(rounds):
        order.extend(targets if round_ % 2 == 0 else list(reversed(targets)))
    return order, rounds


def qido_figures(targets: Sequence[Target], queries: Sequence[Query], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for query in queries:
        tallies = {t.name: Tally() for t in targets}
        order, rounds = _alternated(targets)
        for target in order:
            qido_round(target, query, seconds / rounds, tallies[target.name], min_requests=10 // rounds)
        row: dict[str, Any] = {"catalog": query.catalog, "query": query.text, "expected": query.expected}
        for name, tally in tallies.items():
            median, p95 = _stats(tally.ms)
            row[name] = {"requests": tally.answers, "median_ms": median, "p95_ms": p95, "found": tally.found,
                         "truncated": tally.truncated, "failures": tally.failures, "first_failure": tally.first_failure}
        row["ratio_median"] = _ratio(row, "median_ms")
        rows.append(row)
    return rows


def wado_figures(targets: Sequence[Target], study: StudyFacts, references: dict[tuple[str, str], Reference],
                 seconds: float) -> list[dict[str, Any]]:
    rows = []
    for syntax in SYNTAXES:
        for clients in CLIENTS:
            tallies = {t.name: Tally() for t in targets if (t.name, syntax) in references}
            order, rounds = _alternated([t for t in targets if t.name in tallies])
            for target in order:
                wado_round(target, f"{target.root}/studies/{study.uid}", accept_for(syntax),
                           references[(target.name, syntax)], clients, seconds / rounds, tallies[target.name])
            row: dict[str, Any] = {"transfer_syntax": syntax, "clients": clients}
            for name, tally in tallies.items():
                median, p95 = _stats(tally.ms)
                reference = references[(name, syntax)]
                per_s = tally.answers / tally.seconds if tally.seconds > 0 else None
                row[name] = {
                    "studies": tally.answers, "seconds": tally.seconds,
                    "instances_per_s": per_s * reference.parts if per_s is not None else None,
                    "mb_per_s": tally.bytes / tally.seconds / MB if tally.seconds > 0 else None,
                    "median_ms": median, "p95_ms": p95, "bytes_per_study": reference.size,
                    "served_syntaxes": list(reference.transfer_syntaxes),
                    "failures": tally.failures, "first_failure": tally.first_failure,
                }
            row["ratio_instances_per_s"] = _ratio(row, "instances_per_s")
            row["ratio_mb_per_s"] = _ratio(row, "mb_per_s")
            row["ratio_median"] = _ratio(row, "median_ms")
            rows.append(row)
    return rows


def _ratio(row: dict[str, Any], key: str) -> float | None:
    mine, theirs = row.get(MEDARCHIVE, {}).get(key), (row.get(ORTHANC) or {}).get(key)
    return mine / theirs if mine is not None and theirs else None


def _warm_clients(target: Target, url: str, accept: str, reference: Reference) -> None:
    """One checked retrieval on each client's own connection, all at once; the first failure is raised."""
    failures: list[BaseException] = []

    def one(index: int) -> None:
        try:
            fetch_study(target.client(index), url, accept, reference)
        except (CheckFailed, httpx.HTTPError) as exc:
            failures.append(exc)

    for index in range(max(CLIENTS)):
        target.client(index)  # made here: Target.client is not meant for concurrent creation
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(max(CLIENTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def warm_up(targets: Sequence[Target], study: StudyFacts, queries: Sequence[Query], pixels: dict[str, np.ndarray],
            *, wado: bool = True) -> tuple[dict[tuple[str, str], Reference], dict[str, str]]:
    """Open every client's connection, run each search once, and check each server's study answer in depth.

    Returns the references of the (server, syntax) pairs that passed, and why the others did not.
    """
    references: dict[tuple[str, str], Reference] = {}
    problems: dict[str, str] = {}
    for target in targets:
        for query in queries:
            try:
                qido_once(target.client(0), qido_url(target, query), query.expected)
            except (CheckFailed, httpx.HTTPError):
                pass  # counted when measured
        for syntax in SYNTAXES if wado else ():
            url = f"{target.root}/studies/{study.uid}"
            try:
                reference = check_study_answer(target.client(0).get(url, headers={"Accept": accept_for(syntax)}),
                                               study, syntax, pixels)
                _warm_clients(target, url, accept_for(syntax), reference)
            except (CheckFailed, httpx.HTTPError, ValueError, AttributeError) as exc:
                problems[f"{target.name} {syntax}"] = f"{type(exc).__name__}: {exc}"
                continue
            references[(target.name, syntax)] = reference
    return references, problems


# --- the run ------------------------------------------------------------------------------------------------------


def run_serve_benchmark(
    data: Path,
    *,
    quick: bool = False,
    seconds: float = 3.0,
    orthanc: bool = True,
    studies: int = 10_000,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure QIDO-RS and WADO-RS on medarchive (and Orthanc when installed) over ``data``; a JSON-able dict."""
    data = Path(data)
    if not data.is_dir():
        raise ArchiveError(f"--data: not a folder: {data} (set MEDARCHIVE_SHARED_DATA or give --data)")
    if seconds <= 0 or studies < 0:
        raise ArchiveError("--seconds must be positive and --studies at least 0")
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    paths = [data / folder for folder in (QUICK_FOLDERS if quick else FULL_FOLDERS)]
    files, _skipped = discover(paths)
    facts = describe_sources(files)
    study = pick_wado_study(facts)
    pixels = {str(ds.SOPInstanceUID): ds.pixel_array for ds in (pydicom.dcmread(p) for p in study.files)}
    real_rows = [(s.patient_id, s.patient_name, s.date, s.modalities) for s in facts.values()]
    year = study.date[:4] or "1900"
    data_queries = searches("data set", study, f"{year}0101-{year}1231", study.patient_name[:1] or "A", real_rows)
    why_no_orthanc = orthanc_missing() if orthanc else "not measured (--no-orthanc)"
    launcher = serve_launcher()
    token = secrets.token_urlsafe(24)
    result: dict[str, Any] = {
        "benchmark": "serve", "data": str(data.resolve()), "quick": quick,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds_per_figure": seconds,
        "cores": default_jobs(),
        "machine": {"cpu_model": cpu_model(), "python": sys.version.split()[0], "platform": platform.platform()},
        "launcher": launcher, "codec": dict(CODEC_CONFIG),
        "orthanc": {"measured": why_no_orthanc is None, "why_not": why_no_orthanc,
                    "version": orthanc_version() if why_no_orthanc is None else None},
        "dataset": {"folders": [str(p.relative_to(data)) for p in paths], "files": len(files),
                    "studies": len(facts), "instances": sum(len(s.files) for s in facts.values())},
        "wado_study": {"study_uid": study.uid, "instances": len(study.files),
                       "matrices": sorted(f"{r}x{c}" for r, c in study.matrices)},
    }
    bearer = {"Authorization": f"Bearer {token}"}
    with tempfile.TemporaryDirectory(prefix="medarchive-bench-serve-", dir=workdir) as tmp_name, \
            contextlib.ExitStack() as stack:  # leaves first: servers stopped, clients closed, then the folder goes
        tmp = Path(tmp_name)
        home = tmp / "home"
        say(f"ingesting {len(files)} files into a fresh home")
        result["medarchive_ingest"] = ingest_home(home, paths, token)
        targets = [Target(MEDARCHIVE, "", bearer)]
        for target in targets:
            stack.callback(target.close)
        if why_no_orthanc is None:
            say("starting Orthanc and loading it")
            orthanc_server = stack.enter_context(Orthanc(tmp / "orthanc"))
            result["orthanc_load"] = dataclasses.asdict(load_orthanc(orthanc_server, files, say))
            targets.append(Target(ORTHANC, orthanc_server.dicomweb, {}))
            stack.callback(targets[-1].close)
        server, targets[0].root = medarchive_server(home, token, launcher, tmp / "medarchive.log")
        say(f"starting the medarchive server ({launcher})")
        with server:
            say("warming up and checking the answers")
            references, problems = warm_up(targets, study, data_queries, pixels)
            result["answer_checks"] = {
                "passed": {f"{name} {syntax}": {"parts": ref.parts, "bytes": ref.size,
                                                "transfer_syntaxes": list(ref.transfer_syntaxes)}
                           for (name, syntax), ref in references.items()},
                "failed": problems}
            say("QIDO-RS on the data set's catalog")
            result["qido"] = qido_figures(targets, data_queries, seconds)
            say("WADO-RS of the study")
            result["wado"] = wado_figures(targets, study, references, seconds)
        targets[0].close()  # its connections went with the server
        if studies:
            say(f"adding {studies} generated studies to medarchive's catalog")
            generated = generated_rows(studies)
            result["generated"] = {"studies": studies, "insert_seconds": add_generated_studies(home, token, generated)}
            rows = real_rows + [(g["patient_id"], g["patient_name"], g["study_date"], {g["modality"]})
                                for g in generated]
            example = StudyFacts("", generated[0]["patient_id"], generated[0]["patient_name"], "")
            label = f"{len(facts) + studies} studies"
            big = searches(label, example, "20100101-20101231", "A", rows)
            big += searches(label, example, "20100101-20101231", "A", rows, page=PAGE)
            server, targets[0].root = medarchive_server(home, token, launcher, tmp / "medarchive-generated.log")
            with server:
                say(f"QIDO-RS on {label}")
                warm_up(targets[:1], study, big, pixels, wado=False)
                result["qido"] += qido_figures(targets[:1], big, seconds)
    result["goals"] = goals(result)
    result["notes"] = notes(result)
    result["seconds"] = time.perf_counter() - started
    return result


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each met, missed, or not measurable (None) in this run."""
    out: list[dict[str, Any]] = []
    for syntax, factor in ((EXPLICIT_LE, 1.0), ("*", 1.0), ("*", 2.0)):
        ratios = [row["ratio_instances_per_s"] for row in result.get("wado", []) if row["transfer_syntax"] == syntax]
        known = [r for r in ratios if r is not None]
        label = "Explicit VR LE" if syntax == EXPLICIT_LE else "transfer-syntax=*"
        out.append({"goal": f"WADO-RS study, {label}: at least {factor:g}x Orthanc's instances/s (1 and 8 clients)",
                    "met": (min(known) >= factor) if known and len(known) == len(ratios) else None,
                    "ratios": ratios})
    for paged in (False, True):
        rows = [row for row in result.get("qido", []) if row["catalog"] != "data set"
                and ("&limit=" in row["query"]) == paged]
        medians = [row[MEDARCHIVE]["median_ms"] for row in rows]
        ok = bool(rows) and all(m is not None and m < QIDO_GOAL_MS for m in medians)
        capped = [row["query"] for row in rows if row[MEDARCHIVE]["truncated"]]
        how = f"with limit={PAGE}" if paged else "as sent, no limit" + (
            f" (the server's default page cut {len(capped)} of {len(rows)} answers)" if capped else "")
        out.append({"goal": f"QIDO-RS median < {QIDO_GOAL_MS:g} ms at {rows[0]['catalog'] if rows else '(not run)'}, "
                            + how, "met": ok if rows else None, "medians_ms": medians})
    return out


def notes(result: dict[str, Any]) -> list[str]:
    out = [
        f"medarchive: fresh home (SQLite, codec {result['codec']['id']}, normalization off), server started as "
        f"`{result['launcher']}` on loopback; client in the benchmark process (httpx, one Client per thread, "
        "keep-alive, Accept-Encoding: identity)",
        f"each figure: {ROUNDS} alternated rounds per server (one when medarchive is alone), "
        f"{result['seconds_per_figure']:g} s per server in all, after a warm-up; QIDO: one client, sequential "
        "requests, at least 10 per server",
        "WADO-RS: ms per study = one GET of the whole study until its last byte; instances/s and MB/s = all clients "
        "together over the wall time of the round; MB = 10^6 bytes of multipart body",
    ]
    if result["orthanc"]["measured"]:
        out.append(f"Orthanc {result['orthanc']['version']} with its DICOMweb plugin, private, loaded by POST "
                   "/instances with the same files transcoded to JPEG-LS Lossless; HTTP compression off. Its QIDO "
                   "figures are on the data set's catalog only (not loaded with the generated studies)")
    else:
        out.append(f"Orthanc: {result['orthanc']['why_not']}")
    if result.get("generated"):
        out.append(f"{result['generated']['studies']} generated studies bulk-inserted into medarchive's catalog "
                   "(Study + one Series each), server restarted; searches on them: an existing PatientID, "
                   "PatientName=A*, one year of StudyDate, ModalitiesInStudy=CT")
    return out
