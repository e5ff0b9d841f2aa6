"""The service commands of ``medarchive`` as an administrator types them (real subprocesses)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import shared_data
from tests.integration.test_cli import _json, medarchive

POLICY = ('[policies.ct-to-jpegxl]\ncodec = { id = "jpegxl", effort = 7 }\nmodalities = ["CT"]\n'
          'from_codecs = ["jpegls"]\nwindow = "00:00-00:00"\n')  # an empty window: only by hand


def _ct(tmp_path: Path, count: int = 3) -> Path:
    folder = tmp_path / "ct"
    folder.mkdir()
    for path in sorted(p for p in (shared_data() / "ct-chest-tcia").rglob("*") if p.is_file())[:count]:
        shutil.copyfile(path, folder / f"{path.parent.parent.name}-{path.parent.name}-{path.name}")
    return folder


def test_recompress_dry_run_then_by_hand_then_verify_and_gc(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "medarchive.toml").write_text(POLICY)
    assert medarchive(home, "ingest", str(_ct(tmp_path))).returncode == 0
    plan = _json(medarchive(home, "recompress", "--policy", "ct-to-jpegxl", "--dry-run", "--json"))
    assert plan["instances"] == 3 and plan["by_codec"] == {"jpegls": 3}
    assert _json(medarchive(home, "jobs", "--json"))["jobs"][0]["kind"] == "ingest"  # a dry run queues nothing

    done = medarchive(home, "recompress", "--policy", "ct-to-jpegxl")
    assert done.returncode == 0, done.stderr
    assert "started, 3 instance(s)" in done.stdout
    listed = _json(medarchive(home, "jobs", "--json"))["jobs"]
    assert listed[0]["kind"] == "recompress" and listed[0]["status"] == "done"
    assert listed[0]["outcomes"] == {"recompressed": 3}
    again = _json(medarchive(home, "recompress", "--policy", "ct-to-jpegxl", "--dry-run", "--json"))
    assert again["instances"] == 0

    verified = _json(medarchive(home, "verify", "--json"))
    assert verified["problems"] == [] and verified["blobs_checked"] >= 6
    kept = _json(medarchive(home, "gc", "--dry-run", "--json"))  # default grace: a day
    assert kept["blob_rows"] == 0
    freed = _json(medarchive(home, "gc", "--grace", "0", "--json"))
    assert freed["blob_rows"] == 3  # the three JPEG-LS frames the JPEG-XL generation replaced

    with sqlite3.connect(home / "catalog.sqlite") as catalog:  # a frame still referenced, where the catalog says
        pack, offset, size = catalog.execute(
            "SELECT pack, \"offset\", size FROM blobs JOIN encoded_frames ON blob_sha256 = sha256 LIMIT 1").fetchone()
    with open(home / "blobs" / "packs" / pack, "r+b") as handle:
        handle.seek(offset + size - 1)
        last = handle.read(1)
        handle.seek(offset + size - 1)
        handle.write(bytes([last[0] ^ 0xFF]))
    broken = medarchive(home, "verify")
    assert broken.returncode == 1 and "corrupt" in broken.stdout


def test_unknown_policy_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    result = medarchive(home, "recompress", "--policy", "nope", "--dry-run")
    assert result.returncode == 2 and "no re-compression policy 'nope'" in result.stderr


def test_ingest_wait_queues_through_the_broker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    queue = f"medarchive-test-{uuid.uuid4().hex[:12]}"
    (home / "medarchive.toml").write_text(f'broker_url = "redis://127.0.0.1:6379/7"\nqueue = "{queue}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), MEDARCHIVE_NORMALIZE="off")  # counts here are of originals
    worker = subprocess.Popen([sys.executable, "-m", "archive.cli", "worker", "--concurrency", "1"], env=env,
                              cwd=home.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        source = _ct(tmp_path, 2)
        before = {p.name: p.read_bytes() for p in source.iterdir()}
        result = medarchive(home, "ingest", "--wait", "--timeout", "90", "--json", str(source))
        report = _json(result)
        assert [j["status"] for j in report["jobs"]] == ["done"] * len(report["jobs"])
        assert sum(j["outcomes"].get("stored", 0) for j in report["jobs"]) == 2
        assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # sources handed to ingest: untouched
        studies = _json(medarchive(home, "studies", "--json"))
        assert sum(s["instances"] for s in studies) == 2
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
