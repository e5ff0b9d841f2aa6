"""The web page: study list with search, a study's series, and the slice viewer (server-rendered, a little JS).

Every template is rendered with autoescape on: patient names and every other
header value are attacker-controlled input. The Content-Security-Policy allows
scripts and styles only from ``/static/``, so nothing here is inline: no
``<script>`` bodies, no ``style=`` attributes, no ``on*=`` handlers. The
bpp-PSNR plot is SVG drawn here and placed in the page as markup.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from archive.api.auth import csrf_token
from archive.api.deps import archive_of, record, status_of
from archive.errors import ArchiveError, NotFoundError
from archive.kinds import AccessAction
from archive.services.query import StudyFilter, find_studies, parse_date_range, show_study
from archive.services.rendering import PNG, Window
from archive.services.viewer import Figure, Pane, render_pane, series_view

router = APIRouter()

HERE = Path(__file__).parent
STATIC = HERE / "static"
PAGE_LIMIT = 200

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                        trim_blocks=True, lstrip_blocks=True)


def _size(n: int | float | None) -> str:
    if not n:
        return "0 B"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _num(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞" if value > 0 else "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _date(value: str | None) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if value and len(value) == 8 else (value or "")


def _person(value: str | None) -> str:
    """A DICOM PN for reading (``^`` between components becomes a space); still escaped by the template."""
    return " ".join(part for part in (value or "").split("^") if part) or "—"


templates.filters.update(size=_size, num=_num, date=_date, person=_person)


def _page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(csrf_token=csrf_token(request), **context)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------------------------------------- pages


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def study_list(request: Request, patient: str = "", date: str = "", modality: str = "") -> HTMLResponse:
    """The study list; ``patient`` matches name or ID (``*``/``?`` wildcards; without them, a substring)."""
    form = {"patient": patient.strip(), "date": date.strip(), "modality": modality.strip()}
    error = None
    studies: list[dict[str, Any]] = []
    matched = 0
    try:
        studies, matched = _search(request, **form)
    except ArchiveError as exc:
        error = str(exc).replace("--date", "date")
    record(request, AccessAction.SEARCH, "ui:" + ",".join(k for k, v in form.items() if v),
           status=400 if error else 200, instances=len(studies))
    return _page(request, "studies.html", status=400 if error else 200, form=form, studies=studies,
                 matched=matched, error=error, limit=PAGE_LIMIT)


def _search(request: Request, patient: str, date: str, modality: str) -> tuple[list[dict[str, Any]], int]:
    archive = archive_of(request)
    date_from, date_to = parse_date_range(date) if date else (None, None)
    base = StudyFilter(date_from=date_from, date_to=date_to, modality=modality or None)
    if not patient:
        found = find_studies(archive, base, limit=PAGE_LIMIT)
        return found.studies, found.matched
    pattern = patient if any(c in patient for c in "*?") else f"*{patient}*"
    by_name = find_studies(archive, StudyFilter(**{**base.__dict__, "patient_name": pattern}), limit=PAGE_LIMIT)
    by_id = find_studies(archive, StudyFilter(**{**base.__dict__, "patient_id": pattern}), limit=PAGE_LIMIT)
    merged = {s["study_uid"]: s for s in by_name.studies + by_id.studies}
    studies = sorted(merged.values(), key=lambda s: (s["study_date"] or ""), reverse=True)
    return studies[:PAGE_LIMIT], max(len(merged), by_name.matched, by_id.matched)


@router.get("/ui/studies/{study}", response_class=HTMLResponse, include_in_schema=False)
def study_page(request: Request, study: str) -> HTMLResponse:
    """A study's series, originals and derived ones, each with a thumbnail and what its storage cost and lost."""
    shown = show_study(archive_of(request), study)
    if shown["study_uid"] != study:  # show_study also takes a series UID
        raise NotFoundError(f"no study with Study Instance UID {study!r}")
    series = [_series_summary(s) for s in shown["series"]]
    series.sort(key=lambda s: (s["derived_from"] is not None, s["number"] if s["number"] is not None else 1 << 30))
    record(request, AccessAction.METADATA, f"ui:{study}", instances=sum(s["instances"] for s in series))
    return _page(request, "study.html", study=shown, series=series)


def _series_summary(series: dict[str, Any]) -> dict[str, Any]:
    """One row of the study page: the series' current encodings summed (sizes) and worst-cased (errors)."""
    current = [e for i in series["instances"] if i["conflict_seq"] == 0 for e in i["encodings"] if e["current"]]
    before = sum(e["bytes_before"] for e in current)
    after = sum(e["bytes_after"] for e in current)
    pixel_bits = [e["bits_per_pixel"] * e["bytes_before"] for e in current]
    psnrs = [e["psnr"] for e in current if e["psnr"] is not None]
    errors = [e["max_abs_error"] for e in current if e["max_abs_error"] is not None]
    bounds = [e["max_error_bound"] for e in current if e["max_error_bound"] is not None]
    derivation = series["derivation"]
    return {
        "uid": series["series_uid"], "number": series["series_number"], "modality": series["modality"],
        "description": series["description"], "derived_from": series["derived_from"],
        "kind": derivation["kind"] if derivation else "original",
        "profile": derivation["profile"] if derivation else None,
        "instances": len([i for i in series["instances"] if i["conflict_seq"] == 0]),
        "codecs": sorted({e["codec"] for e in current}),
        "bytes_before": before, "bytes_after": after, "ratio": before / after if after else None,
        "bpp": sum(pixel_bits) / before if before else None,
        "psnr": min(psnrs) if psnrs else None, "lossless": bool(current) and not psnrs and not any(bounds),
        "max_error": max(errors) if errors else None, "bound": max(bounds) if bounds else None,
    }


@router.get("/ui/studies/{study}/series/{series}", response_class=HTMLResponse, include_in_schema=False)
def viewer_page(request: Request, study: str, series: str) -> HTMLResponse:
    """The slice viewer: original, reconstruction and difference side by side, and the rate-distortion figures."""
    view = series_view(archive_of(request), study, series)
    record(request, AccessAction.METADATA, f"ui:{study}/{series}", instances=len(view.figures))
    initial = view.windows[0][1] if view.windows else None
    return _page(request, "viewer.html", view=view, initial=initial, plot=rd_plot(view.figures, view.source_figures))


@router.get("/ui/images/{sop}/{frame}/{pane}.png", include_in_schema=False)
def pane_image(request: Request, sop: str, frame: int, pane: Pane,
               window: str | None = Query(None, description="centre,width in modality units")) -> Response:
    """One viewer pane as PNG; ``frame`` counts from 0."""
    target = f"{sop}/{frame}/{pane.value}"
    try:
        data = render_pane(archive_of(request), sop, frame, pane, window=Window.parse(window) if window else None)
    except ArchiveError as exc:
        record(request, AccessAction.RENDERED, target, status=status_of(exc))
        raise
    record(request, AccessAction.RENDERED, target, nbytes=len(data))
    return Response(data, media_type=PNG, headers={"Cache-Control": "private, max-age=600"})


# ---------------------------------------------------------------------------------------------- the plot


def rd_plot(figures: list[Figure], source: list[Figure], width: int = 420, height: int = 260) -> dict[str, Any]:
    """Points of a bits-per-pixel vs PSNR plot (SVG coordinates); exact encodings sit on a top 'lossless' line."""
    margin_l, margin_r, margin_t, margin_b = 52, 12, 22, 36
    all_figures = figures + source
    if not all_figures:
        return {"width": width, "height": height, "points": [], "xticks": [], "yticks": [], "empty": True}
    xs = [f.bits_per_pixel for f in all_figures]
    ys = [f.psnr for f in all_figures if f.psnr is not None and math.isfinite(f.psnr)]
    x_hi = max(max(xs), 1e-6) * 1.1
    y_lo = math.floor(min(ys) / 5) * 5 - 5 if ys else 30.0
    y_hi = math.ceil(max(ys) / 5) * 5 + 5 if ys else 100.0
    inner_w, inner_h = width - margin_l - margin_r, height - margin_t - margin_b
    lossless_y = margin_t - 10

    def x_of(v: float) -> float:
        return round(margin_l + v / x_hi * inner_w, 1)

    def y_of(v: float | None) -> float:
        if v is None or not math.isfinite(v):
            return lossless_y
        return round(margin_t + (y_hi - v) / (y_hi - y_lo) * inner_h, 1)

    points = [{"x": x_of(f.bits_per_pixel), "y": y_of(f.psnr), "series": series, "lossless": f.psnr is None,
               "label": f"#{_num(f.instance_number)} {f.codec}: {f.bits_per_pixel:.3f} bpp, "
                        f"{'lossless' if f.psnr is None else f'{f.psnr:.2f} dB'}"}
              for series, group in (("this", figures), ("source", source)) for f in group]
    xticks = [{"x": x_of(x_hi * k / 4), "label": f"{x_hi * k / 4:.2f}"} for k in range(5)]
    yticks = [{"y": y_of(y_lo + (y_hi - y_lo) * k / 4), "label": f"{y_lo + (y_hi - y_lo) * k / 4:.0f}"}
              for k in range(5)]
    return {"width": width, "height": height, "points": points, "xticks": xticks, "yticks": yticks, "empty": False,
            "left": margin_l, "right": width - margin_r, "top": margin_t, "bottom": height - margin_b,
            "lossless_y": lossless_y}
