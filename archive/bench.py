"""``medarchive bench ingest``: the archive's ingest next to a bare Python loop doing the same work.

One run measures, on the same files (every file under the folder, as
``medarchive ingest`` finds them), interleaved and best of ``repeat``:

* the **reference**: a single-core Python loop -- read and parse each file
  (``read_instance``), decode its stored pixel frames (``iter_frames``),
  JPEG-LS encode every frame with the archive's codec, decode it again and
  compare (``np.array_equal``), sha256 of the encoded bytes, write each result
  to its own file with fsync. Objects without encodable pixels are hashed and
  written as read. Files that cannot be read are counted and skipped;
* ``ingest_paths`` (what ``medarchive ingest`` runs) with ``jobs=1``, into a
  fresh temporary home, codec JPEG-LS;
* the same with ``jobs`` = the number of cores (or ``--jobs``).

Figures are set as ratios to the reference row of the same run: the machine is
shared and noisy. The stored size of an ingest row is measured after the run,
with the SQLite WAL checkpointed and the archive closed: content = sum of the
sizes of the files under the home, allocated = blocks of every file and folder
(as ``du``). MB = 10^6 bytes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import numpy as np
import sqlalchemy as sa
from rich import box
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import URL, make_url

from archive.catalog.database import upgrade_schema
from archive.codecs import decode_frame, get_codec
from archive.config import Settings
from archive.dicom.reader import iter_frames, read_instance
from archive.errors import ArchiveError, NotDicomError
from archive.kinds import StorageMode
from archive.services.ingest import default_jobs, Outcome, discover, ingest_paths
from archive.services.runtime import Archive

MB: Final[float] = 1e6
#: The codec every row uses (the archive's default).
CODEC_CONFIG: Final[dict[str, Any]] = {"id": "jpegls"}
REFERENCE: Final[str] = "reference"


@dataclass(frozen=True)
class TreeSize:
    """What a folder holds: bytes of its files, and bytes allocated on disk for files and folders."""

    content_bytes: int
    allocated_bytes: int
    files: int
    folders: int


def measure_tree(root: Path) -> TreeSize:
    """Sum ``st_size`` of every file and ``st_blocks * 512`` of every file and folder under ``root`` (``du``)."""
    content = allocated = files = folders = 0
    seen: set[tuple[int, int]] = set()
    for folder, _dirs, names in os.walk(root):
        entries = [Path(folder)] + [Path(folder) / name for name in names]
        for index, path in enumerate(entries):
            st = path.lstat()
            if (st.st_dev, st.st_ino) in seen:  # a hard link counts once, as in du
                continue
            seen.add((st.st_dev, st.st_ino))
            allocated += st.st_blocks * 512
            if index == 0:
                folders += 1
            else:
                files += 1
                content += st.st_size
    return TreeSize(content, allocated, files, folders)


@dataclass
class Pass:
    """One timed pass of one row."""

    seconds: float
    instances: int
    bytes_in: int
    outcomes: dict[str, int] = field(default_factory=dict)
    size: TreeSize | None = None
    mismatches: int = 0


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def reference_pass(files: Sequence[Path], out_dir: Path) -> Pass:
    """The bare loop: read, decode pixels, encode, decode and compare, sha256, write with fsync; one core."""
    codec = get_codec(dict(CODEC_CONFIG))
    out_dir.mkdir(parents=True, exist_ok=True)
    instances = bytes_in = mismatches = not_dicom = unreadable = 0
    started = time.perf_counter()
    for path in files:
        try:
            parsed = read_instance(path)
            if parsed.mode is StorageMode.PIXELS:
                payloads = []
                for frame in iter_frames(parsed):
                    data = codec.encode(frame)
                    if not np.array_equal(decode_frame(data), frame):
                        mismatches += 1
                    payloads.append(data)
            else:  # no pixels to encode (passthrough, whole objects): stored as read
                payloads = [parsed.source_bytes]
        except NotDicomError:
            not_dicom += 1
            continue
        except ArchiveError:
            unreadable += 1
            continue
        for data in payloads:
            _write_synced(out_dir / hashlib.sha256(data).hexdigest(), data)
        instances += 1
        bytes_in += len(parsed.source_bytes)
    seconds = time.perf_counter() - started
    return Pass(seconds, instances, bytes_in, {"encoded": instances, "not_dicom": not_dicom,
                                                "unreadable": unreadable}, mismatches=mismatches)


def _checkpoint_sqlite(archive: Archive) -> None:
    connection = archive.engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cursor.fetchall()
        cursor.close()
    finally:
        connection.close()


def ingest_pass(folder: Path, home: Path, jobs: int, database_url: str | None) -> Pass:
    """``ingest_paths`` into a fresh ``home`` (catalog on ``database_url``, else the embedded SQLite)."""
    settings = Settings.load(environ={}, home=home, database_url=database_url)
    archive = Archive.open(settings)  # the embedded SQLite is created here; a server database was migrated before
    try:
        started = time.perf_counter()
        report = ingest_paths(archive, [folder], codec_config=dict(CODEC_CONFIG), jobs=jobs)
        seconds = time.perf_counter() - started
        if settings.is_sqlite:
            _checkpoint_sqlite(archive)
    finally:
        archive.close()
    return Pass(seconds, report.instances, report.bytes_in, {o.value: report.count(o) for o in Outcome},
                size=measure_tree(home))


def server_url(database_url: str) -> URL:
    """The parsed ``--database-url``; only PostgreSQL is supported (the default is the embedded SQLite)."""
    try:
        url = make_url(database_url)
    except sa.exc.ArgumentError as exc:
        raise ArchiveError(f"--database-url: not a database URL: {database_url!r}") from exc
    if url.get_backend_name() != "postgresql":
        raise ArchiveError(f"--database-url: only PostgreSQL is supported, not {url.get_backend_name()!r} "
                           "(without it the catalog is the embedded SQLite)")
    return url


@contextmanager
def temporary_database(server: URL) -> Iterator[str]:
    """A fresh PostgreSQL database on ``server``, migrated to head, dropped afterwards; yields its URL."""
    name = f"medarchive_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            url = server.set(database=name).render_as_string(hide_password=False)
            upgrade_schema(url)
            yield url
        finally:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _row(name: str, jobs: int, best: Pass, runs: list[float], reference: Pass | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": name,
        "jobs": jobs,
        "instances": best.instances,
        "seconds": best.seconds,
        "instances_per_s": best.instances / best.seconds if best.seconds > 0 else None,
        "bytes_in": best.bytes_in,
        "mb_per_s": best.bytes_in / best.seconds / MB if best.seconds > 0 else None,
        "x_reference": None,
        "content_bytes": best.size.content_bytes if best.size else None,
        "allocated_bytes": best.size.allocated_bytes if best.size else None,
        "files_stored": best.size.files if best.size else None,
        "folders": best.size.folders if best.size else None,
        "in_per_allocated": None,
        "in_per_content": None,
        "outcomes": best.outcomes,
        "runs_s": runs,
    }
    if name == REFERENCE:
        row["roundtrip_mismatches"] = best.mismatches
    ref_rate = reference.instances / reference.seconds if reference and reference.seconds > 0 else None
    if ref_rate and row["instances_per_s"] is not None:
        row["x_reference"] = row["instances_per_s"] / ref_rate
    if best.size:
        if best.size.allocated_bytes:
            row["in_per_allocated"] = best.bytes_in / best.size.allocated_bytes
        if best.size.content_bytes:
            row["in_per_content"] = best.bytes_in / best.size.content_bytes
    return row


def run_ingest_benchmark(
    folder: Path,
    *,
    jobs: int | None = None,
    repeat: int = 1,
    database_url: str | None = None,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the reference loop and ``ingest_paths`` (1 and ``jobs`` processes) on ``folder``; a JSON-able dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"not a folder: {folder}")
    if repeat < 1 or (jobs is not None and jobs < 1):
        raise ArchiveError("--repeat and --jobs must be at least 1")
    if workdir is not None and not Path(workdir).is_dir():
        raise ArchiveError(f"--workdir: not a folder: {workdir}")
    server = server_url(database_url) if database_url else None
    cores = default_jobs()
    parallel = jobs if jobs is not None else cores
    job_counts = [1] if parallel == 1 else [1, parallel]
    say = progress or (lambda _message: None)

    files, _hidden = discover([folder])
    input_bytes = 0
    for path in files:  # warm the page cache: every row then reads the files from memory alike
        input_bytes += len(path.read_bytes())

    plan = [(REFERENCE, 1), *((f"ingest jobs={n}", n) for n in job_counts)]  # (row, processes)
    best: dict[str, Pass] = {}
    runs: dict[str, list[float]] = {name: [] for name, _n in plan}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medarchive-bench-", dir=workdir) as tmp:
        reference_pass(files[:3], Path(tmp) / "warm-up")  # libraries loaded before any clock runs
        for attempt in range(repeat):
            for name, n in plan:
                say(f"run {attempt + 1}/{repeat}: {name} on {len(files)} files")
                target = Path(tmp) / f"{name.replace(' ', '-').replace('=', '')}-{attempt}"
                if name == REFERENCE:
                    result = reference_pass(files, target)
                else:
                    with temporary_database(server) if server else nullcontext(None) as url:
                        result = ingest_pass(folder, target, n, url)
                shutil.rmtree(target, ignore_errors=True)
                runs[name].append(result.seconds)
                if name not in best or result.seconds < best[name].seconds:
                    best[name] = result

    reference = best[REFERENCE]
    rows = [_row(name, n, best[name], runs[name], reference) for name, n in plan]
    notes = [
        "reference: one core; read_instance + iter_frames, JPEG-LS encode, decode + np.array_equal, sha256, "
        "one file per encoded frame written with fsync; objects without encodable pixels written as read; "
        "instances = files read, MB/s of their bytes",
        "ingest: ingest_paths into a fresh temporary home; instances = stored + conflicts, MB/s of their source bytes",
        "content = sum of file sizes under the home; allocated = blocks of every file and folder (du); "
        "measured after the run with the archive closed (SQLite: WAL checkpointed first)",
    ]
    if server:
        notes.append("catalog on PostgreSQL (a fresh database per run, dropped afterwards): "
                     "content and allocated bytes count the home only, not the database")
    return {
        "benchmark": "ingest",
        "folder": str(folder.resolve()),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "codec": dict(CODEC_CONFIG),
        "database": server.render_as_string(hide_password=True) if server else "sqlite (embedded)",
        "workdir": str(Path(workdir or tempfile.gettempdir()).resolve()),
        "repeat": repeat,
        "cores": cores,
        "machine": {"cpu_model": cpu_model(), "python": sys.version.split()[0], "platform": platform.platform()},
        "files": len(files),
        "input_bytes": input_bytes,
        "rows": rows,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.2f}"


def print_ingest_benchmark(result: dict[str, Any], console: Console) -> None:
    """The result as a table, ratios to the reference row, and what each row means."""
    console.print(f"[bold]Ingest benchmark[/bold] of {result['folder']} ({result['files']} files, "
                  f"{result['input_bytes'] / MB:.2f} MB)  {result['when']}")
    console.print(f"{result['cores']} core(s), {result['machine']['cpu_model']}; Python {result['machine']['python']}; "
                  f"codec {result['codec']['id']}; catalog {result['database']}; best of {result['repeat']}; "
                  f"temporary files under {result['workdir']}")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("row", no_wrap=True)
    for column in ("inst", "s", "inst/s", "MB/s", "× ref", "content\nMB", "alloc\nMB", "in /\nalloc",
                   "in /\ncontent"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result["rows"]:
        table.add_row(row["name"], str(row["instances"]), f"{row['seconds']:.2f}", _num(row["instances_per_s"], 1),
                      _num(row["mb_per_s"]), _num(row["x_reference"]), _mb(row["content_bytes"]),
                      _mb(row["allocated_bytes"]), _num(row["in_per_allocated"]), _num(row["in_per_content"]))
    console.print(table)
    for row in result["rows"]:
        outcomes = ", ".join(f"{k} {v}" for k, v in row["outcomes"].items())
        extra = f"; round-trip mismatches {row['roundtrip_mismatches']}" if "roundtrip_mismatches" in row else ""
        if row["files_stored"] is not None:
            extra += f"; home holds {row['files_stored']} files in {row['folders']} folders"
        console.print(f"{row['name']}: {outcomes}{extra}; runs " + ", ".join(f"{s:.2f}" for s in row["runs_s"]) + " s",
                      markup=False)
    for note in result["notes"]:
        console.print(f"• {note}", markup=False)
