"""The web page over real HTTP: sign in with the token, the study list and search, a study's series, the viewer.

Patient names are attacker-controlled: the fixture's HTML name must come back
escaped on every page. The viewer's difference image of the lossy series must
show the codec's error at the scale the page states.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import imagecodecs
import numpy as np
import pytest
from sqlalchemy import select

from archive.catalog.models import Derivation, Instance, Series, Study
from archive.kinds import AccessAction, DerivationKind
from archive.services.access import list_access
from archive.services.retrieve import read_frame
from tests.integration.api.conftest import HTML_NAME, TOKEN, Served

RAW = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def page(served: Served) -> Iterator[httpx.Client]:
    """A client signed in through the form, as a browser is: it carries only the session cookie."""
    with httpx.Client(base_url=served.url, timeout=30) as client:
        answer = client.post("/session", data={"token": TOKEN})
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/"
        assert client.cookies, "no session cookie was set"
        yield client


def _series_of(served: Served, study_uid: str, kind: DerivationKind | None) -> list[str]:
    """The study's series UIDs: originals (kind None) or the derived ones of that kind."""
    with served.archive.unit_of_work() as uow:
        query = select(Series.series_uid).join(Study).where(Study.study_uid == study_uid)
        if kind is None:
            query = query.where(Series.derived_from_id.is_(None))
        else:
            query = query.join(Derivation, Derivation.series_id == Series.id).where(Derivation.kind == kind)
        return list(uow.session.scalars(query.order_by(Series.id)))


def _lossy(served: Served) -> tuple[str, str, str]:
    """(lossy series UID, its instance's SOP UID, the source instance's SOP UID)."""
    series_uid = _series_of(served, served.ct_study_uid, DerivationKind.LOSSY)[0]
    with served.archive.unit_of_work() as uow:
        instance = uow.session.scalars(select(Instance).join(Series).where(Series.series_uid == series_uid)).one()
        source = uow.session.get(Instance, instance.derived_from_id)
        assert source is not None
        return series_uid, instance.sop_instance_uid, source.sop_instance_uid


def _image_sources(html: str) -> dict[str, str]:
    return {pane: src.replace("&amp;", "&") for pane, src in
            re.findall(r'<img id="pane-(\w+)"[^>]*?src="([^"]+)"', html)}


def _png(client: httpx.Client, url: str) -> np.ndarray:
    answer = client.get(url)
    assert answer.status_code == 200, (url, answer.text)
    assert answer.headers["content-type"] == "image/png"
    assert answer.content.startswith(PNG_MAGIC)
    image: np.ndarray = imagecodecs.png_decode(answer.content)
    return image


def _assert_no_inline_code(html: str) -> None:
    """What the Content-Security-Policy would block: inline scripts, style attributes, event handlers."""
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert not re.search(r"<style\b|\sstyle=", html), "inline style"
    assert not re.search(r"\son[a-z]+=", html, re.IGNORECASE), "inline event handler"


def test_list_shows_the_studies_and_escapes_the_html_name(page: httpx.Client, served: Served) -> None:
    answer = page.get("/")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    for study in (served.ct_study_uid, served.mr_study_uid, served.html_study_uid):
        assert f'href="/ui/studies/{study}"' in html
    assert ESCAPED in html and "&lt;b&gt;Bold&lt;/b&gt;" in html
    assert RAW not in html and "<b>Bold</b>" not in html
    assert re.search(r'<meta name="csrf-token" content="[0-9a-f]{16,}">', html), "the session's CSRF token"
    _assert_no_inline_code(html)


def test_search_narrows_by_patient_date_and_modality(page: httpx.Client, served: Served) -> None:
    with served.archive.unit_of_work() as uow:
        ct = uow.session.scalars(select(Study).where(Study.study_uid == served.ct_study_uid)).one()
        patient_id, study_date = ct.patient_id, ct.study_date
    assert patient_id and study_date

    def found(**params: str) -> set[str]:
        answer = page.get("/", params=params)
        assert answer.status_code == 200, answer.text
        return set(re.findall(r'<tr data-study="([^"]+)"', answer.text))

    by_id = found(patient=patient_id)
    assert served.ct_study_uid in by_id and not {served.mr_study_uid, served.html_study_uid} & by_id
    by_name = found(patient="*alert*")  # the HTML name, by wildcard
    assert served.html_study_uid in by_name and served.ct_study_uid not in by_name
    by_date = found(date=f"{study_date}-{study_date}")
    assert served.ct_study_uid in by_date and served.html_study_uid not in by_date
    by_modality = found(modality="MR")
    assert served.mr_study_uid in by_modality and not {served.ct_study_uid, served.html_study_uid} & by_modality
    assert found(patient=patient_id, modality="MR") == set()
    bad = page.get("/", params={"date": "2024-13"})
    assert bad.status_code == 400 and "date" in bad.text


def test_study_page_lists_the_lossy_derivative_with_its_bound(page: httpx.Client, served: Served) -> None:
    lossy_uid = _series_of(served, served.ct_study_uid, DerivationKind.LOSSY)[0]
    normalized_uid = _series_of(served, served.ct_study_uid, DerivationKind.NORMALIZED)[0]
    answer = page.get(f"/ui/studies/{served.ct_study_uid}")
    assert answer.status_code == 200
    html = answer.text
    row = re.search(rf'<tr data-series="{re.escape(lossy_uid)}" data-kind="lossy".*?</tr>', html, re.S)
    assert row is not None, "the lossy series is listed and marked"
    assert "DERIVED: lossy" in row.group(0) and "jpegls" in row.group(0)
    assert re.search(r'<td class="n bound">2</td>', row.group(0)), "its promised bound (JPEG-LS near 2)"
    assert f'<tr data-series="{normalized_uid}" data-kind="normalized"' in html
    assert f'src="/studies/{served.ct_study_uid}/series/{lossy_uid}/thumbnail"' in html
    assert f'href="/ui/studies/{served.ct_study_uid}/series/{lossy_uid}"' in html
    html_page = page.get(f"/ui/studies/{served.html_study_uid}").text
    assert ESCAPED in html_page and RAW not in html_page
    _assert_no_inline_code(html)
    assert page.get("/ui/studies/1.2.3.999").status_code == 404


def test_viewer_difference_of_the_lossy_series_shows_the_error_at_its_scale(page: httpx.Client,
                                                                           served: Served) -> None:
    series_uid, sop, source_sop = _lossy(served)
    answer = page.get(f"/ui/studies/{served.ct_study_uid}/series/{series_uid}")
    assert answer.status_code == 200
    html = answer.text
    _assert_no_inline_code(html)
    assert 'data-kind="lossy-derived"' in html and "<svg" in html and '<table class="grid figures" id="source-figures"' in html
    panes = _image_sources(html)
    assert set(panes) == {"original", "reconstruction", "difference"}
    assert all(f"/ui/images/{sop}/0/" in url for url in panes.values())
    original = read_frame(served.archive, source_sop, 0).astype(np.int64)
    reconstruction = read_frame(served.archive, sop, 0).astype(np.int64)
    error = reconstruction - original
    top = int(np.abs(error).max())
    assert 0 < top <= 2, "JPEG-LS near 2 keeps its bound"
    assert f"−{top} / +{top} stored values" in html, "the page says the difference scale"
    shown = _png(page, panes["difference"]).astype(np.int64)
    assert shown.shape == error.shape
    deviation = shown - 128
    assert deviation.any(), "the difference image is not flat"
    assert np.array_equal(deviation == 0, error == 0)
    assert np.array_equal(np.abs(deviation) == 127, np.abs(error) == top), "the largest error reaches black/white"
    assert np.array_equal(np.sign(deviation), np.sign(error))
    for pane in ("original", "reconstruction"):
        image = _png(page, panes[pane])
        assert image.shape == error.shape and image.dtype == np.uint8 and image.std() > 10
    recorded = [r.target for r in list_access(served.archive, action=AccessAction.RENDERED, limit=20)]
    assert f"{sop}/0/difference" in recorded


def test_viewer_window_changes_the_picture_and_lossless_panes_agree(page: httpx.Client, served: Served) -> None:
    series_uid, sop, _ = _lossy(served)
    narrow = _png(page, f"/ui/images/{sop}/0/original.png?window=40,400")
    wide = _png(page, f"/ui/images/{sop}/0/original.png?window=-600,1500")
    assert not np.array_equal(narrow, wide)
    assert page.get(f"/ui/images/{sop}/0/original.png?window=40,-1").status_code == 400
    assert page.get(f"/ui/images/{sop}/7/original.png").status_code == 404
    assert page.get(f"/ui/images/{sop}/0/sideways.png").status_code == 422
    # a lossless original: original = reconstruction, difference flat; the normalized series: the source
    # resampled with the recorded maps reproduces the stored normalized pixels exactly
    for kind in (None, DerivationKind.NORMALIZED):
        uid = _series_of(served, served.ct_study_uid, kind)[0]
        html = page.get(f"/ui/studies/{served.ct_study_uid}/series/{uid}").text
        panes = _image_sources(html)
        assert np.array_equal(_png(page, panes["original"]), _png(page, panes["reconstruction"]))
        assert (_png(page, panes["difference"]) == 128).all()
    mr_series = _series_of(served, served.mr_study_uid, None)[0]
    mr = page.get(f"/ui/studies/{served.mr_study_uid}/series/{mr_series}")
    assert mr.status_code == 200 and len(re.findall(r'<li data-sop="', mr.text)) == 8
    html_series = _series_of(served, served.html_study_uid, None)[0]
    viewer = page.get(f"/ui/studies/{served.html_study_uid}/series/{html_series}").text
    assert RAW not in viewer
    assert page.get(f"/ui/studies/{served.mr_study_uid}/series/{series_uid}").status_code == 404


def test_static_files_are_served_and_nothing_else(served: Served) -> None:
    with httpx.Client(base_url=served.url) as anonymous:
        css = anonymous.get("/static/page.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        js = anonymous.get("/static/page.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        for name in ("page.py", "..%2Fpage.py", ".hidden.js", "missing.js"):
            assert anonymous.get(f"/static/{name}").status_code == 404
        assert anonymous.get("/", headers={"Accept": "text/html"}).status_code == 401
        assert HTML_NAME not in anonymous.get("/ui/studies/" + served.html_study_uid).text
