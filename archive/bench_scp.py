"""``medarchive bench scp``: DICOM C-STORE into ``medarchive scp`` next to Orthanc, same client, same run.

One run on the shared data (all of ``ct-chest-tcia`` and the ``mr-*`` folders;
``quick``: one CT patient and a few MR instances):

1. C-STORE with dcmtk's ``storescu`` over 1 association (every file) and over
   ``concurrency`` associations at once (the files dealt round-robin, so a
   study may arrive over several associations, which the SCP must join).
   Each run gets a fresh home (embedded SQLite catalog and broker unless
   ``broker_url`` is given), ``medarchive scp`` and ``medarchive worker`` as
   real processes, normalization as configured by default (on) and
   ``MEDARCHIVE_STABLE_AGE`` = ``stable_age``. *To acknowledgment*: until the
   last ``storescu`` exits; *to archived*: until the catalog holds every
   instance with status ``stored`` (encoded, verified, catalogued), both from
   the moment the first ``storescu`` starts.
2. C-GET (``getscu``) of the largest study from the archive of the
   1-association run, every received file checked against the study's
   SOP Instance UIDs.
3. When Orthanc is installed: a private Orthanc with a DICOM listener on a
   free port gets the same ``storescu`` runs (fresh storage each run) and the
   same ``getscu``. Orthanc stores synchronously: its acknowledgment is its
   stored time (its instance count is checked over REST afterwards).

The dcmtk tools, and Orthanc (built on DCMTK), run with ``TCP_NODELAY=1``
unless ``nodelay`` is off: Debian's DCMTK leaves Nagle's algorithm on, which
on loopback costs ~40 ms per small instance and measures TCP, not the servers.
Runs alternate (medarchive, Orthanc, Orthanc, medarchive). MB = 10^6 bytes of
the source files.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import httpx
import pydicom
import sqlalchemy as sa

import archive
from archive.bench import cpu_model
from archive.bench_serve import FULL_FOLDERS
from archive.bench_serve_orthanc import (
    ORTHANC_AET,
    Orthanc,
    ServerProcess,
    free_port,
    orthanc_missing,
    orthanc_version,
)
from archive.catalog.models import Instance, InstanceStatus
from archive.config import Settings
from archive.errors import ArchiveError
from archive.services.discovery import discover
from archive.services.ingest import default_jobs
from archive.services.runtime import Archive

MB: Final[float] = 1e6
MEDARCHIVE: Final[str] = "medarchive"
ORTHANC: Final[str] = "orthanc"
SCP_AET: Final[str] = "MEDARCHIVE"
CALLING_AET: Final[str] = "BENCHSCU"
QUICK_FOLDERS: Final[tuple[str, ...]] = ("ct-chest-tcia/A002304", "mr-siemens-prisma")
QUICK_FILES: Final[int] = 16  # the CT patient's 6 files and 10 MR instances
POLL_SECONDS: Final[float] = 0.1
WORKER_GRACE: Final[float] = 1.0  # a Celery worker's warm shutdown takes ~5 s: the benchmark does not wait for it


@dataclass(frozen=True)
class SourceFile:
    """One file sent: what the archive must end up holding."""

    path: Path
    size: int
    sop_instance_uid: str
    study_uid: str


def describe(files: Sequence[Path]) -> list[SourceFile]:
    """Every file pydicom reads with a SOP Instance and Study UID (headers only); others are not sent."""
    described = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001  (not DICOM: storescu would not send it either)
            continue
        sop, study = str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", ""))
        if sop and study:
            described.append(SourceFile(path, path.stat().st_size, sop, study))
    return described


def deal(files: Sequence[SourceFile], groups: int) -> list[list[SourceFile]]:
    """``groups`` lists of nearly equal length, dealt round-robin in path order (a study spans associations)."""
    return [list(files[start::groups]) for start in range(groups) if files[start::groups]]


def largest_study(files: Sequence[SourceFile]) -> tuple[str, list[SourceFile]]:
    studies: dict[str, list[SourceFile]] = {}
    for source in files:
        studies.setdefault(source.study_uid, []).append(source)
    uid = max(sorted(studies), key=lambda s: len(studies[s]))
    return uid, studies[uid]


def tool_env(nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def listening(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
        return False
    return check


# --- the clients --------------------------------------------------------------------------------------------------


@dataclass
class StoreRun:
    """What the ``storescu`` processes of one run did."""

    started: float  # perf_counter when the first storescu was started
    seconds: float  # until the last one exited
    per_association: list[float]
    failures: list[str]


def run_storescu(groups: Sequence[Sequence[SourceFile]], aec: str, port: int, env: dict[str, str], logs: Path
                 ) -> StoreRun:
    """One ``storescu`` per group, all started at once; a non-zero exit or a failed store is a failure."""
    binary = shutil.which("storescu")
    if binary is None:
        raise ArchiveError("storescu is not installed (Debian package dcmtk)")
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    started = time.perf_counter()
    for index, group in enumerate(groups):
        out = (logs / f"storescu-{index}.log").open("wb")
        command = [binary, "-aet", CALLING_AET, "-aec", aec, "127.0.0.1", str(port), *(str(f.path) for f in group)]
        processes.append((subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL), out, index))
    ends: list[float] = []
    failures: list[str] = []
    for process, out, index in processes:
        process.wait()
        ends.append(time.perf_counter())
        out.close()
        text = (logs / f"storescu-{index}.log").read_text(errors="replace")
        problems = [line for line in text.splitlines() if line.startswith(("E:", "F:"))]
        if process.returncode != 0 or problems:
            failures.append(f"storescu {index}: exit {process.returncode}; {' | '.join(problems[:3])}")
    return StoreRun(started, max(ends) - started, [end - started for end in ends], failures)


def run_getscu(aec: str, port: int, study_uid: str, expected: Sequence[SourceFile], env: dict[str, str],
               out: Path) -> dict[str, Any]:
    """C-GET of the study (Study Root, STUDY level); wall time, then every received file checked."""
    binary = shutil.which("getscu")
    if binary is None:
        raise ArchiveError("getscu is not installed (Debian package dcmtk)")
    out.mkdir(parents=True, exist_ok=True)
    command = [binary, "-S", "-aet", CALLING_AET, "-aec", aec, "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={study_uid}", "-od", str(out), "127.0.0.1", str(port)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    received = [p for p in out.iterdir() if p.is_file()]
    uids = set()
    for path in received:
        with contextlib.suppress(Exception):
            uids.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    wanted = {f.sop_instance_uid for f in expected}
    size = sum(p.stat().st_size for p in received)
    failures = []
    if done.returncode != 0:
        failures.append(f"getscu exit {done.returncode}: {(done.stdout + done.stderr).strip()[-300:]}")
    if uids != wanted:
        failures.append(f"{len(uids & wanted)} of {len(wanted)} instances received, {len(uids - wanted)} others")
    ok = not failures
    return {"seconds": seconds, "instances": len(received), "bytes": size,
            "instances_per_s": len(received) / seconds if ok else None,
            "mb_per_s": size / seconds / MB if ok else None, "failures": failures}


# --- medarchive ---------------------------------------------------------------------------------------------------


@dataclass
class MedarchiveService:
    """``medarchive scp`` and ``medarchive worker`` over a fresh home, as processes."""

    home: Path
    env: dict[str, str]
    port: int
    workers: int

    @classmethod
    def fresh(cls, folder: Path, *, stable_age: float, workers: int, broker_url: str) -> MedarchiveService:
        repo = str(Path(archive.__file__).resolve().parents[1])
        # a fresh archive with the defaults, but the codec and normalization a caller chose (MEDARCHIVE_CODEC,
        # MEDARCHIVE_NORMALIZE) are kept: they decide most of the archiving rate
        kept = ("MEDARCHIVE_CODEC", "MEDARCHIVE_NORMALIZE")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_") or k in kept}
        env.update(MEDARCHIVE_HOME=str(folder / "home"), MEDARCHIVE_STABLE_AGE=f"{stable_age:g}",
                   PYTHONPATH=os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p))
        if broker_url:
            env["MEDARCHIVE_BROKER_URL"] = broker_url
        return cls(folder / "home", env, free_port(), workers)

    @property
    def settings(self) -> Settings:
        return Settings.load(environ=self.env)

    @contextlib.contextmanager
    def running(self) -> Iterator[sa.Engine]:
        """Both roles started (catalog created first, as ``medarchive run`` does); yields an engine on the catalog."""
        Archive.open(self.settings).close()
        command = [sys.executable, "-m", "archive.cli"]
        worker_log = self.home.parent / "worker.log"
        scp = ServerProcess("medarchive scp", [*command, "scp", "--host", "127.0.0.1", "--port", str(self.port)],
                            env=self.env, log=self.home.parent / "scp.log", ready=listening(self.port),
                            new_session=True)
        worker = ServerProcess(
            "medarchive worker", [*command, "worker", "--concurrency", str(self.workers), "--name",
                                  f"bench-{os.getpid()}-{self.port}@%h"],
            env=self.env, log=worker_log, new_session=True,
            ready=lambda: worker_log.exists() and " ready." in worker_log.read_text(errors="replace"))
        engine = sa.create_engine(self.settings.database_url)
        try:
            worker.launch()
            scp.launch()
            worker.wait_ready()
            scp.wait_ready()
            yield engine
        finally:
            engine.dispose()
            scp.stop()
            worker.stop(grace=WORKER_GRACE)  # its work is done or abandoned; the home is thrown away


def archived_count(engine: sa.Engine, uids: Sequence[str]) -> int:
    """How many of ``uids`` the catalog holds with status stored (0 while the catalog is busy)."""
    query = sa.select(sa.func.count(sa.distinct(Instance.sop_instance_uid))).where(
        Instance.status == InstanceStatus.STORED, Instance.sop_instance_uid.in_(list(uids)))
    try:
        with engine.connect() as connection:
            return int(connection.scalar(query) or 0)
    except sa.exc.OperationalError:
        return 0


def wait_archived(engine: sa.Engine, uids: Sequence[str], started: float, timeout: float) -> tuple[float | None, int]:
    """Seconds from ``started`` until every instance is archived (None on timeout), and the count reached."""
    deadline = time.perf_counter() + timeout
    count = 0
    while time.perf_counter() < deadline:
        count = archived_count(engine, uids)
        if count >= len(uids):
            return time.perf_counter() - started, count
        time.sleep(POLL_SECONDS)
    return None, count


def _rates(instances: int, size: int, seconds: float | None) -> dict[str, float | None]:
    if not seconds:
        return {"instances_per_s": None, "mb_per_s": None}
    return {"instances_per_s": instances / seconds, "mb_per_s": size / seconds / MB}


def medarchive_run(files: Sequence[SourceFile], associations: int, folder: Path, *, stable_age: float, workers: int,
                   broker_url: str, nodelay: bool, get_study: tuple[str, list[SourceFile]] | None) -> dict[str, Any]:
    service = MedarchiveService.fresh(folder, stable_age=stable_age, workers=workers, broker_url=broker_url)
    uids = [f.sop_instance_uid for f in files]
    size = sum(f.size for f in files)
    env = tool_env(nodelay)
    with service.running() as engine:
        store = run_storescu(deal(files, associations), SCP_AET, service.port, env, folder / "logs")
        timeout = store.seconds + stable_age + 60 + 0.5 * len(files)
        archived, count = wait_archived(engine, uids, store.started, timeout)
        result: dict[str, Any] = {
            "instances": len(files), "bytes": size, "ack_seconds": store.seconds,
            "per_association_seconds": store.per_association, "archived_seconds": archived, "archived": count,
            "ack": _rates(len(files), size, store.seconds if not store.failures else None),
            "archived_rate": _rates(len(files), size, archived), "failures": list(store.failures),
            "normalize": service.settings.normalize}
        if archived is None:
            result["failures"].append(f"{count} of {len(files)} instances archived after {timeout:.0f} s")
        if get_study is not None:
            result["get"] = run_getscu(SCP_AET, service.port, get_study[0], get_study[1], env, folder / "get")
    return result


# --- Orthanc ------------------------------------------------------------------------------------------------------


def orthanc_stored(orthanc: Orthanc) -> int:
    answer = httpx.get(f"{orthanc.url}/statistics", timeout=30.0)
    answer.raise_for_status()
    return int(answer.json()["CountInstances"])


def orthanc_run(files: Sequence[SourceFile], associations: int, folder: Path, *, nodelay: bool,
                get_study: tuple[str, list[SourceFile]] | None) -> dict[str, Any]:
    port = free_port()
    size = sum(f.size for f in files)
    env = tool_env(nodelay)
    with Orthanc(folder, dicom_port=port, extra_env={"TCP_NODELAY": "1"} if nodelay else None) as orthanc:
        deadline = time.monotonic() + 30
        while not listening(port)():
            if time.monotonic() > deadline:
                raise ArchiveError(f"Orthanc's DICOM port {port} does not listen: {orthanc.log_tail()}")
            time.sleep(0.1)
        store = run_storescu(deal(files, associations), ORTHANC_AET, port, env, folder / "logs")
        stored = orthanc_stored(orthanc)
        failures = list(store.failures)
        if stored != len(files):
            failures.append(f"Orthanc holds {stored} instances, {len(files)} sent")
        result: dict[str, Any] = {
            "instances": len(files), "bytes": size, "ack_seconds": store.seconds,
            "per_association_seconds": store.per_association, "stored": stored,
            "ack": _rates(len(files), size, store.seconds if not failures else None), "failures": failures}
        if get_study is not None:
            result["get"] = run_getscu(ORTHANC_AET, port, get_study[0], get_study[1], env, folder / "get")
    return result


# --- the run ------------------------------------------------------------------------------------------------------


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine is not None and theirs else None


def run_scp_benchmark(
    data: Path,
    *,
    quick: bool = False,
    orthanc: bool = True,
    concurrency: int = 4,
    workers: int | None = None,
    stable_age: float = 1.0,
    broker_url: str = "",
    nodelay: bool = True,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """C-STORE (1 and ``concurrency`` associations) and C-GET on medarchive and Orthanc; a JSON-able dict."""
    data = Path(data)
    if not data.is_dir():
        raise ArchiveError(f"--data: not a folder: {data} (set MEDARCHIVE_SHARED_DATA or give --data)")
    if concurrency < 2 or stable_age < 0:
        raise ArchiveError("--concurrency must be at least 2 and --stable-age at least 0")
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    workers = workers or default_jobs()
    paths = [data / folder for folder in (QUICK_FOLDERS if quick else FULL_FOLDERS)]
    found, _skipped = discover(paths)
    files = describe(found)
    if quick:
        files = files[:QUICK_FILES]
    if not files:
        raise ArchiveError(f"no DICOM files under {', '.join(map(str, paths))}")
    get_study = largest_study(files)
    why_no_orthanc = orthanc_missing() if orthanc else "not measured (--no-orthanc)"
    result: dict[str, Any] = {
        "benchmark": "scp", "data": str(data.resolve()), "quick": quick,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cores": default_jobs(),
        "machine": {"cpu_model": cpu_model(), "python": sys.version.split()[0], "platform": platform.platform()},
        "dataset": {"folders": [str(p.relative_to(data)) for p in paths], "files": len(files),
                    "studies": len({f.study_uid for f in files}), "bytes": sum(f.size for f in files)},
        "medarchive": {"broker": broker_url or "embedded (kombu SQLAlchemy transport on SQLite in the home)",
                       "catalog": "SQLite", "normalize": None,
                       "stable_age": stable_age, "worker_concurrency": workers},
        "tcp_nodelay": nodelay, "concurrency": concurrency,
        "orthanc": {"measured": why_no_orthanc is None, "why_not": why_no_orthanc,
                    "version": orthanc_version() if why_no_orthanc is None else None},
        "get_study": {"study_uid": get_study[0], "instances": len(get_study[1]),
                      "bytes": sum(f.size for f in get_study[1])},
    }
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    plan = [(MEDARCHIVE, 1), (ORTHANC, 1), (ORTHANC, concurrency), (MEDARCHIVE, concurrency)]
    with tempfile.TemporaryDirectory(prefix="medarchive-bench-scp-", dir=workdir) as tmp_name:
        for index, (server, associations) in enumerate(plan):
            if server == ORTHANC and why_no_orthanc is not None:
                continue
            folder = Path(tmp_name) / f"{index}-{server}-{associations}"
            say(f"{server}: C-STORE of {len(files)} files over {associations} association(s)")
            study = get_study if associations == 1 else None
            if server == MEDARCHIVE:
                runs[(server, associations)] = medarchive_run(
                    files, associations, folder, stable_age=stable_age, workers=workers, broker_url=broker_url,
                    nodelay=nodelay, get_study=study)
            else:
                runs[(server, associations)] = orthanc_run(files, associations, folder, nodelay=nodelay,
                                                           get_study=study)
    result["medarchive"]["normalize"] = runs[(MEDARCHIVE, 1)]["normalize"]
    result["store"] = []
    for associations in (1, concurrency):
        mine, theirs = runs[(MEDARCHIVE, associations)], runs.get((ORTHANC, associations))
        result["store"].append({
            "associations": associations, MEDARCHIVE: mine, ORTHANC: theirs,
            "ratio_ack": _ratio(mine["ack"]["instances_per_s"], (theirs or {}).get("ack", {}).get("instances_per_s")),
            "ratio_archived": _ratio(mine["archived_rate"]["instances_per_s"],
                                     (theirs or {}).get("ack", {}).get("instances_per_s"))})
    mine_get = runs[(MEDARCHIVE, 1)].pop("get")
    theirs_get = (runs.get((ORTHANC, 1)) or {}).pop("get", None)
    result["get"] = {MEDARCHIVE: mine_get, ORTHANC: theirs_get,
                     "ratio": _ratio(mine_get["instances_per_s"], (theirs_get or {}).get("instances_per_s"))}
    result["goals"] = goals(result)
    result["notes"] = notes(result)
    result["seconds"] = time.perf_counter() - started
    return result


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goal per association count: archived/s at least Orthanc's stored/s in the same run."""
    out = []
    for row in result["store"]:
        ratio = row["ratio_archived"]
        out.append({"goal": f"C-STORE over {row['associations']} association(s): instances archived per second "
                            "(stored, verified, catalogued) at least Orthanc's stored per second",
                    "met": None if ratio is None else ratio >= 1.0, "ratio": ratio})
    return out


def notes(result: dict[str, Any]) -> list[str]:
    settings = result["medarchive"]
    out = [
        f"medarchive: a fresh home per run; `medarchive scp` and `medarchive worker --concurrency "
        f"{settings['worker_concurrency']}` as processes; broker {settings['broker']}; catalog {settings['catalog']}; "
        f"normalization {'on' if settings['normalize'] else 'off'} (the default is on; MEDARCHIVE_NORMALIZE); "
        f"MEDARCHIVE_STABLE_AGE="
        f"{settings['stable_age']:g} s, which every 'archived' time includes",
        f"clients: dcmtk storescu (one process per association; {result['concurrency']} associations = the files "
        "dealt round-robin, so studies span associations) and getscu (Study Root, STUDY level); "
        + ("TCP_NODELAY=1 for the dcmtk tools and Orthanc" if result["tcp_nodelay"] else
           "Nagle's algorithm as dcmtk's default leaves it"),
        "to acknowledgment: from the first storescu's start until the last one exits; to archived: from the same "
        f"start until the catalog holds every instance with status stored (polled every {POLL_SECONDS:g} s); "
        "MB = 10^6 bytes of the source files",
        f"C-GET: the largest study ({result['get_study']['instances']} instances) from the 1-association run's "
        "archive; every received file's SOP Instance UID checked; MB = bytes of the received files",
    ]
    if result["orthanc"]["measured"]:
        out.append(f"Orthanc {result['orthanc']['version']}: private, fresh storage per run, DICOM listener on a free "
                   "port, default storage (as received, fsync); it stores before it answers, so its acknowledgment "
                   "is its stored time; its instance count is checked over REST")
    else:
        out.append(f"Orthanc: {result['orthanc']['why_not']}")
    return out
