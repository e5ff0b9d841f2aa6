"""The package layering: ``workers`` builds on ``archive``, never the other way round at import time.

The library (``archive``) reaches the batch service only from inside the
commands of ``archive.cli`` that need a broker, and only through
``workers.service``; no module of ``workers`` imports the command.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import workers.service
from tests.conftest import REPO


def _imports(path: Path) -> list[tuple[str, bool, list[str]]]:
    """(module, at module level?, names) for every import statement of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top_level, [alias.name for alias in node.names]))
    return found


def _is(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_library_imports_workers_only_through_the_service_module_inside_commands() -> None:
    offenders = []
    for path in sorted((REPO / "archive").rglob("*.py")):
        for module, top_level, _names in _imports(path):
            if not _is(module, "workers"):
                continue
            if top_level or path.parent != REPO / "archive" / "cli" or module != "workers.service":
                offenders.append(f"{path.relative_to(REPO)}: {module}{' (module level)' if top_level else ''}")
    assert not offenders, offenders


def test_what_the_command_imports_from_workers_exists() -> None:
    wanted = {name for path in (REPO / "archive" / "cli").glob("*.py") for module, _top, names in _imports(path)
              if module == "workers.service" for name in names}
    assert wanted, "the command no longer reaches the service at all?"
    assert wanted <= set(workers.service.__all__), wanted - set(workers.service.__all__)
    assert all(callable(getattr(workers.service, name)) or name == "celery_app" for name in wanted)


def test_workers_never_import_the_command() -> None:
    for path in sorted((REPO / "workers").rglob("*.py")):
        for module, _top, names in _imports(path):
            assert not _is(module, "archive.cli"), f"{path.relative_to(REPO)} imports {module}"
            assert not (module == "archive" and "cli" in names), f"{path.relative_to(REPO)} imports archive.cli"


def test_importing_the_command_loads_neither_workers_nor_celery() -> None:
    code = ("import sys, archive.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('workers', 'celery', 'kombu')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
