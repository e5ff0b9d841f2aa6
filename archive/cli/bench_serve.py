"""``medarchive bench serve``: DICOMweb QIDO-RS and WADO-RS against Orthanc, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from archive.cli._app import bench_app, console, err_console, run_benchmark
from archive.cli._format import number, print_goals_and_notes

# as in archive.bench_serve (not imported here: the command line loads the benchmark's libraries only when it runs)
MB: Final[float] = 1e6
EXPLICIT_LE: Final[str] = "1.2.840.10008.1.2.1"
MEDARCHIVE: Final[str] = "medarchive"
ORTHANC: Final[str] = "orthanc"


@bench_app.command("serve")
def bench_serve(
    data: Annotated[Optional[Path], typer.Option("--data", file_okay=False, help="The shared data folder "
                                                 "(default: $MEDARCHIVE_SHARED_DATA, else ../shared/data beside "
                                                 "the repository).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="One CT patient and one MR series instead of all of "
                                        "ct-chest-tcia and the mr-* folders.")] = False,
    seconds: Annotated[float, typer.Option("--seconds", min=0.05, help="Seconds per figure and server (split in "
                                           "alternated rounds).")] = 3.0,
    orthanc: Annotated[bool, typer.Option("--orthanc/--no-orthanc", help="Measure Orthanc beside medarchive when "
                                          "it is installed.")] = True,
    studies: Annotated[int, typer.Option("--studies", min=0, help="Studies generated in medarchive's catalog for "
                                         "the large-catalog QIDO figures (0: none).")] = 10_000,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", file_okay=False, help="Where the temporary home "
                                                    "and Orthanc's storage go (default: the system's temporary "
                                                    "folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table for the README instead of "
                                           "the console tables.")] = False,
) -> None:
    """QIDO-RS latency and WADO-RS study retrieval (1 and 8 clients) of medarchive's server beside Orthanc's, on the
    same data, same client, same run; ratios and the issue's goals."""
    from archive.bench_serve import default_data, run_serve_benchmark

    options: dict[str, Any] = dict(quick=quick, seconds=seconds, orthanc=orthanc, studies=studies, workdir=workdir)
    folder = data or default_data()
    if markdown and not as_json:
        with err_console.status("benchmark…") as status:
            result = run_serve_benchmark(folder, progress=status.update, **options)
        console.print(markdown_serve_benchmark(result), markup=False, highlight=False, soft_wrap=True)
        return
    run_benchmark(run_serve_benchmark, print_serve_benchmark, folder, options, as_json)


def _ms(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("median_ms") is None:
        return "-" if not stat or not stat.get("failures") else f"FAILED ({stat['failures']})"
    text = f"{stat['median_ms']:.1f} / {stat['p95_ms']:.1f}"
    return text + (f" ({stat['failures']} failed)" if stat.get("failures") else "")


def _syntax_label(syntax: str) -> str:
    return "Explicit VR LE" if syntax == EXPLICIT_LE else "transfer-syntax=*"


def _found(row: dict[str, Any]) -> str:
    stat = row.get(MEDARCHIVE) or {}
    return f"{stat.get('found', 0)}/{row['expected']}"


def print_serve_benchmark(result: dict[str, Any], console: Console) -> None:
    """The result as rich tables: QIDO, WADO-RS, the goals and what each figure means."""
    console.print(f"[bold]DICOMweb benchmark[/bold] on {result['data']} ({result['dataset']['files']} files, "
                  f"{result['dataset']['studies']} studies)  {result['when']}")
    console.print(f"{result['cores']} core(s), {result['machine']['cpu_model']}; Python {result['machine']['python']}; "
                  f"server: {result['launcher']}", markup=False)
    if not result["orthanc"]["measured"]:
        console.print(f"[yellow]Orthanc not measured:[/yellow] {result['orthanc']['why_not']}", highlight=False)
    for key, problem in result.get("answer_checks", {}).get("failed", {}).items():
        console.print(f"[red]answer check failed[/red] {key}: {problem}", highlight=False)
    qido = Table(title="QIDO-RS /studies, ms median / p95", box=box.SIMPLE_HEAD, pad_edge=False,
                 collapse_padding=True)
    for column in ("catalog", "query", "found", "medarchive", "Orthanc", "ratio"):
        left = column in ("catalog", "query")
        qido.add_column(column, justify="left" if left else "right", no_wrap=not left, overflow="fold")
    for row in result.get("qido", []):
        qido.add_row(row["catalog"], row["query"], _found(row), _ms(row.get(MEDARCHIVE)), _ms(row.get(ORTHANC)),
                     number(row["ratio_median"]))
    console.print(qido)
    wado = Table(title=f"WADO-RS of a study ({result['wado_study']['instances']} instances, "
                       f"{', '.join(result['wado_study']['matrices'])}); × = instances/s ratio",
                 box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("syntax", "clients", "server", "inst/s", "MB/s", "ms med", "ms p95", "MB/study", "×"):
        wado.add_column(column, justify="left" if column in ("syntax", "server") else "right", no_wrap=True)
    for row in result.get("wado", []):
        for name in (MEDARCHIVE, ORTHANC):
            stat = row.get(name)
            if stat is None:
                continue
            failed = f" ({stat['failures']} failed)" if stat.get("failures") else ""
            wado.add_row("expl. LE" if row["transfer_syntax"] == EXPLICIT_LE else "*", str(row["clients"]),
                         name + failed, number(stat["instances_per_s"], 1), number(stat["mb_per_s"], 1),
                         number(stat["median_ms"], 1), number(stat["p95_ms"], 1), number(stat["bytes_per_study"] / MB),
                         number(row["ratio_instances_per_s"]) if name == MEDARCHIVE else "")
    console.print(wado)
    print_goals_and_notes(console, result)


def markdown_serve_benchmark(result: dict[str, Any]) -> str:
    """The figures as a Markdown table for the README."""
    orthanc_name = f"Orthanc {result['orthanc']['version']}" if result["orthanc"]["measured"] else "Orthanc"
    lines = [f"`medarchive bench serve` on {result['dataset']['files']} files of ../shared/data "
             f"({result['cores']} cores, {result['machine']['cpu_model']}; {result['when'][:10]}; "
             f"server: `{result['launcher']}`)", "",
             f"| figure | medarchive | {orthanc_name} | medarchive / Orthanc |", "| --- | --- | --- | --- |"]
    for row in result.get("qido", []):
        lines.append(f"| QIDO `{row['query']}` ({row['catalog']}, {_found(row)} found), ms median / p95 | "
                     f"{_ms(row.get(MEDARCHIVE))} | {_ms(row.get(ORTHANC))} | {number(row['ratio_median'])} |")
    for row in result.get("wado", []):
        label = f"WADO-RS study, {_syntax_label(row['transfer_syntax'])}, {row['clients']} client(s)"
        mine, theirs = row.get(MEDARCHIVE) or {}, row.get(ORTHANC) or {}
        lines.append(f"| {label}: ms per study median / p95 | {_ms(mine)} | {_ms(theirs)} | "
                     f"{number(row['ratio_median'])} |")
        lines.append(f"| {label}: instances/s (MB/s) | {number(mine.get('instances_per_s'), 1)} "
                     f"({number(mine.get('mb_per_s'), 1)}) | {number(theirs.get('instances_per_s'), 1)} "
                     f"({number(theirs.get('mb_per_s'), 1)}) | {number(row['ratio_instances_per_s'])} |")
    lines.append("")
    for goal in result["goals"]:
        lines.append(f"- {goal['goal']}: {({True: 'met', False: 'missed', None: 'not measured'})[goal['met']]}")
    return "\n".join(lines)
