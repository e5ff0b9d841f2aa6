"""Who may ask: every route behind a token or a session, the session's cookie and CSRF rules, the headers."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from sqlalchemy import select

from archive.api import auth
from archive.api.app import create_app
from archive.catalog.models import Instance, Series, Study
from archive.kinds import AccessAction
from archive.services.access import list_access
from tests.integration.api.conftest import OTHER_TOKEN, TOKEN, Served

WRONG = {"Authorization": "Bearer wrong-token-0123456789abcdef"}


def _uids(served: Served) -> dict[str, str]:
    with served.archive.unit_of_work() as uow:
        study, series, instance = uow.session.execute(
            select(Study.study_uid, Series.series_uid, Instance.sop_instance_uid).join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id).where(Study.study_uid == served.ct_study_uid).limit(1)).one()
    return {"study": study, "series": series, "instance": instance, "sop": instance, "pane": "original"}


def _protected_requests(served: Served) -> list[tuple[str, str]]:
    """(method, path) of every route of the app but the public ones, path parameters filled with real UIDs."""
    uids = _uids(served)
    found = []
    for route in iter_route_contexts(create_app(served.archive).routes):
        template = route.path_format
        if template is None or auth.is_public(template):
            continue
        path = re.sub(r"\{([^}:]+)(:[^}]*)?\}", lambda m: uids.get(m.group(1), "1"), template)
        found += [(method, path) for method in sorted(route.methods or {"GET"}) if method != "HEAD"]
    return found


def test_every_route_but_the_public_ones_answers_401_without_a_token_or_with_a_wrong_one(served: Served) -> None:
    requests = _protected_requests(served)
    paths = {path for _, path in requests}
    assert {"/metrics", "/openapi.json", "/docs", "/studies"} <= paths, paths
    with httpx.Client(base_url=served.url, timeout=30) as client:
        for method, path in requests:
            for headers in ({}, WRONG, {"Authorization": f"Basic {TOKEN}"}):
                answer = client.request(method, path, headers=headers)
                assert answer.status_code == 401, (method, path, headers, answer.status_code)
                assert answer.headers["www-authenticate"].startswith("Bearer"), (method, path)
        assert client.get("/health").status_code == 200  # open: no token
        assert client.get("/sign-in").status_code == 200


def test_both_configured_tokens_work_and_the_access_log_names_the_token(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        for token in (TOKEN, OTHER_TOKEN):
            assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        answer = client.post("/session", data={"token": OTHER_TOKEN}, follow_redirects=False)
        assert answer.status_code == 303
    rows = list_access(served.archive, limit=20, action=AccessAction.SIGN_IN)
    assert any(r.token_name == "other" and r.status == 303 for r in rows)
    assert all(OTHER_TOKEN not in r.target and OTHER_TOKEN not in r.token_name for r in rows)


def test_a_session_cookie_opens_reads_and_needs_its_csrf_token_to_change_anything(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        answer = client.post("/session", data={"token": TOKEN, "next": "/metrics"}, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/metrics"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{auth.SESSION_COOKIE}=")
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
        assert "secure" not in cookie.lower()  # plain HTTP here: a Secure cookie would never come back
        value = client.cookies[auth.SESSION_COOKIE]
        assert TOKEN not in value
        assert client.get("/metrics").status_code == 200  # the cookie alone opens a GET
        stow = {"content-type": "application/json"}
        assert client.post("/studies", content=b"{}", headers=stow).status_code == 403  # no CSRF token
        csrf = auth.session_csrf(served.archive.settings.api_tokens, value)
        assert client.post("/studies", content=b"{}", headers={**stow, "X-CSRF-Token": "0" * 64}).status_code == 403
        assert client.post("/studies", content=b"{}", headers={**stow, "X-CSRF-Token": csrf,
                                                               "Origin": "http://evil.example"}).status_code == 403
        # past authentication: STOW itself answers (415: not multipart/related)
        assert client.post("/studies", content=b"{}", headers={**stow, "X-CSRF-Token": csrf,
                                                               "Origin": served.url}).status_code == 415
        signed_out = client.post("/session/delete", follow_redirects=False)
        assert signed_out.status_code == 303 and auth.SESSION_COOKIE not in client.cookies
        assert client.get("/metrics").status_code == 401


def test_signing_in_with_a_wrong_token_or_from_another_origin_fails(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        answer = client.post("/session", data={"token": "nope-0123456789abcdef"}, follow_redirects=False)
        assert answer.status_code == 401 and "set-cookie" not in answer.headers
        assert "not valid" in answer.text and 'name="token"' in answer.text
        answer = client.post("/session", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
        assert answer.status_code == 403 and "set-cookie" not in answer.headers
        answer = client.post("/session", data={"token": TOKEN, "next": "//evil.example/x"}, follow_redirects=False)
        assert answer.headers["location"] == "/"  # no open redirect


def test_a_browser_gets_the_sign_in_page_with_security_headers(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        answer = client.get("/studies", headers={"Accept": "text/html,application/xhtml+xml"})
        assert answer.status_code == 401 and answer.headers["content-type"].startswith("text/html")
        assert 'name="token"' in answer.text and 'value="/studies"' in answer.text
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        page = client.get("/sign-in", params={"next": '/a"><b>x</b>'})
        assert "<b>x</b>" not in page.text and "&lt;b&gt;x&lt;/b&gt;" in page.text  # escaped
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        for headers in ({}, served.headers):
            answer = client.get("/metrics", headers=headers)
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["x-frame-options"] == "DENY"
            assert answer.headers["referrer-policy"] == "same-origin"


def test_unknown_routes_and_methods_answer_json(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30, headers=served.headers) as client:
        missing = client.get("/no/such/route")
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
        wrong_method = client.delete("/metrics")
        assert wrong_method.status_code == 405 and wrong_method.headers["content-type"] == "application/json"


def test_the_openapi_document_declares_the_bearer_scheme_and_the_open_routes(served: Served) -> None:
    spec = httpx.get(f"{served.url}/openapi.json", headers=served.headers, timeout=30).json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearer"]["description"]}
    assert {"bearer": []} in spec["security"]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "401" in spec["paths"]["/metrics"]["get"]["responses"]
    assert {"200", "202", "409", "413", "415"} <= set(spec["paths"]["/studies"]["post"]["responses"])


def test_a_session_ends_when_it_expires_or_its_token_changes() -> None:
    tokens = {"web": "web-token-0123456789abcdef"}
    value = auth.session_value("web", tokens["web"])
    assert auth.session_token_name(tokens, value) == "web"
    assert auth.session_token_name(tokens, value, now=time.time() + auth.SESSION_SECONDS + 5) is None
    assert auth.session_token_name({"web": "rotated-token-0123456789ab"}, value) is None
    assert auth.session_token_name({}, value) is None
    encoded, expires, mac = value.split(".")
    assert auth.session_token_name(tokens, f"{encoded}.{int(expires) + 3600}.{mac}") is None  # extended by hand
    assert auth.session_token_name(tokens, "garbage") is None
    assert auth.session_csrf(tokens, value) and auth.session_csrf(tokens, "garbage") == ""


@pytest.mark.parametrize("path, safe", [("/", "/"), ("/studies/1.2?x=1", "/studies/1.2?x=1"), ("//evil", "/"),
                                        ("https://evil", "/"), ("/\\evil", "/"), ("", "/"), ("/a\nb", "/")])
def test_only_relative_paths_are_followed_after_signing_in(path: str, safe: str) -> None:
    assert auth.safe_next(path) == safe
