"""``medarchive bench scp``: DIMSE C-STORE (1 and N associations) and C-GET against Orthanc, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from archive.cli._app import bench_app, console, err_console, run_benchmark
from archive.cli._format import number, print_goals_and_notes

# as in archive.bench_scp (not imported here: the command line loads the benchmark's libraries only when it runs)
MEDARCHIVE: Final[str] = "medarchive"
ORTHANC: Final[str] = "orthanc"


@bench_app.command("scp")
def bench_scp(
    data: Annotated[Optional[Path], typer.Option("--data", file_okay=False, help="The shared data folder "
                                                 "(default: $MEDARCHIVE_SHARED_DATA, else ../shared/data beside "
                                                 "the repository); its ct-chest-tcia and mr-* folders are sent.")
                    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="16 files (one CT patient, ten MR instances) instead of "
                                        "all of ct-chest-tcia and the mr-* folders.")] = False,
    concurrency: Annotated[int, typer.Option("--concurrency", min=2, help="Associations of the concurrent run "
                                             "(one storescu each).")] = 4,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="`medarchive worker --concurrency` "
                                                   "(default: one per core).")] = None,
    stable_age: Annotated[float, typer.Option("--stable-age", min=0.0, help="MEDARCHIVE_STABLE_AGE of the SCP: "
                                              "seconds without a new instance before a study is queued (part of "
                                              "every 'archived' time).")] = 1.0,
    broker: Annotated[str, typer.Option("--broker", help="MEDARCHIVE_BROKER_URL for the runs, e.g. "
                                        "redis://127.0.0.1:6379/5 (default: the embedded SQLite broker).")] = "",
    nodelay: Annotated[bool, typer.Option("--nodelay/--nagle", help="TCP_NODELAY=1 for the dcmtk tools and "
                                          "Orthanc (Debian's DCMTK leaves Nagle's algorithm on).")] = True,
    orthanc: Annotated[bool, typer.Option("--orthanc/--no-orthanc", help="Measure Orthanc beside medarchive when "
                                          "it is installed.")] = True,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", file_okay=False, help="Where the temporary homes "
                                                    "and Orthanc's storage go (default: the system's temporary "
                                                    "folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table for the README instead of "
                                           "the console tables.")] = False,
) -> None:
    """C-STORE with storescu (1 and N associations; to acknowledgment and to archived) and C-GET of a study with
    getscu, on `medarchive scp` + `medarchive worker` processes and on a private Orthanc; ratios and the goal."""
    from archive.bench_scp import run_scp_benchmark
    from archive.bench_serve import default_data

    options: dict[str, Any] = dict(quick=quick, concurrency=concurrency, workers=workers, stable_age=stable_age,
                                   broker_url=broker, nodelay=nodelay, orthanc=orthanc, workdir=workdir)
    folder = data or default_data()
    if markdown and not as_json:
        with err_console.status("benchmark…") as status:
            result = run_scp_benchmark(folder, progress=status.update, **options)
        console.print(markdown_scp_benchmark(result), markup=False, highlight=False, soft_wrap=True)
        return
    run_benchmark(run_scp_benchmark, print_scp_benchmark, folder, options, as_json)


def _store_cells(stat: dict[str, Any] | None) -> list[str]:
    """ack s, ack inst/s (MB/s), archived s, archived inst/s (MB/s); Orthanc's archived = its acknowledgment."""
    if stat is None:
        return ["-"] * 4
    ack = f"{number(stat['ack']['instances_per_s'], 1)} ({number(stat['ack']['mb_per_s'], 1)})"
    if "archived_rate" in stat:
        done = stat["archived_rate"]
        archived = [number(stat["archived_seconds"], 2),
                    f"{number(done['instances_per_s'], 1)} ({number(done['mb_per_s'], 1)})"]
    else:
        archived = [number(stat["ack_seconds"], 2), ack]
    return [number(stat["ack_seconds"], 2), ack, *archived]


def _failed(stat: dict[str, Any] | None) -> str:
    return f" FAILED: {'; '.join(stat['failures'])}" if stat and stat.get("failures") else ""


def print_scp_benchmark(result: dict[str, Any], console: Console) -> None:
    """The result as rich tables: C-STORE, C-GET, the goal and what each figure means."""
    dataset = result["dataset"]
    console.print(f"[bold]DIMSE benchmark[/bold] on {result['data']} ({dataset['files']} files, "
                  f"{dataset['bytes'] / 1e6:.1f} MB, {dataset['studies']} studies)  {result['when']}")
    console.print(f"{result['cores']} core(s), {result['machine']['cpu_model']}; Python {result['machine']['python']}",
                  markup=False)
    if not result["orthanc"]["measured"]:
        console.print(f"[yellow]Orthanc not measured:[/yellow] {result['orthanc']['why_not']}", highlight=False)
    store = Table(title="C-STORE (storescu): seconds, instances/s (MB/s); Orthanc's archived = its acknowledgment",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("assoc.", "server", "ack s", "ack inst/s (MB/s)", "archived s", "archived inst/s (MB/s)", "×"):
        store.add_column(column, justify="left" if column == "server" else "right", no_wrap=column != "server")
    for row in result["store"]:
        for name in (MEDARCHIVE, ORTHANC):
            stat = row.get(name)
            if stat is None:
                continue
            ratio = number(row["ratio_archived"], 2) if name == MEDARCHIVE else ""
            store.add_row(str(row["associations"]), name + _failed(stat), *_store_cells(stat), ratio)
    console.print(store)
    study = result["get_study"]
    get = Table(title=f"C-GET (getscu) of a study ({study['instances']} instances, {study['bytes'] / 1e6:.2f} MB)",
                box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("server", "seconds", "inst/s", "MB/s", "×"):
        get.add_column(column, justify="left" if column == "server" else "right")
    for name in (MEDARCHIVE, ORTHANC):
        stat = result["get"].get(name)
        if stat is not None:
            get.add_row(name + _failed(stat), number(stat["seconds"], 2), number(stat["instances_per_s"], 1),
                        number(stat["mb_per_s"], 1), number(result["get"]["ratio"], 2) if name == MEDARCHIVE else "")
    console.print(get)
    print_goals_and_notes(console, result)


def markdown_scp_benchmark(result: dict[str, Any]) -> str:
    """The figures as a Markdown table for the README."""
    orthanc_name = f"Orthanc {result['orthanc']['version']}" if result["orthanc"]["measured"] else "Orthanc"
    dataset = result["dataset"]
    lines = [f"`medarchive bench scp` on {dataset['files']} files of ../shared/data ({dataset['bytes'] / 1e6:.1f} MB, "
             f"{dataset['studies']} studies; {result['cores']} cores, {result['machine']['cpu_model']}; "
             f"{result['when'][:10]})", "",
             f"| figure | medarchive | {orthanc_name} | medarchive / Orthanc |", "| --- | --- | --- | --- |"]
    for row in result["store"]:
        mine, theirs = row[MEDARCHIVE], row.get(ORTHANC)
        label = f"C-STORE, {row['associations']} association(s)"
        theirs_ack = (f"{number(theirs['ack']['instances_per_s'], 1)} ({number(theirs['ack']['mb_per_s'], 1)})"
                      if theirs else "-")
        lines.append(f"| {label}, to acknowledgment: s; instances/s (MB/s) | {number(mine['ack_seconds'], 2)}; "
                     f"{number(mine['ack']['instances_per_s'], 1)} ({number(mine['ack']['mb_per_s'], 1)}) | "
                     f"{number(theirs['ack_seconds'], 2) + '; ' if theirs else ''}{theirs_ack} | "
                     f"{number(row['ratio_ack'], 2)} |")
        done = mine["archived_rate"]
        lines.append(f"| {label}, to archived (Orthanc: stored = acknowledged): s; instances/s (MB/s) | "
                     f"{number(mine['archived_seconds'], 2)}; {number(done['instances_per_s'], 1)} "
                     f"({number(done['mb_per_s'], 1)}) | {number(theirs['ack_seconds'], 2) + '; ' if theirs else ''}"
                     f"{theirs_ack} | {number(row['ratio_archived'], 2)} |")
    study = result["get_study"]
    mine_get, theirs_get = result["get"][MEDARCHIVE], result["get"].get(ORTHANC)
    lines.append(f"| C-GET of a {study['instances']}-instance study: s; instances/s (MB/s) | {_get_cell(mine_get)} | "
                 f"{_get_cell(theirs_get)} | {number(result['get']['ratio'], 2)} |")
    lines.append("")
    for goal in result["goals"]:
        lines.append(f"- {goal['goal']}: {({True: 'met', False: 'missed', None: 'not measured'})[goal['met']]}")
    return "\n".join(lines)


def _get_cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "-"
    return f"{number(stat['seconds'], 2)}; {number(stat['instances_per_s'], 1)} ({number(stat['mb_per_s'], 1)})"
