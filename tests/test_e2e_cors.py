"""Per-API CORS through the real daemon: a preflight from an allowed origin gets 204 and the allow
headers before any API-key check, one from another origin 403; answers to an allowed origin carry
`Access-Control-Allow-Origin` and `Vary: Origin`; an API without `cors` answers as before. The spec's
`cors` is strict."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import ECHO_PREDICTOR, Cirrus, module_daemon, write_project
from pydantic import ValidationError

from cirrus.spec import CorsSpec
from cirrus.types import ApiStatusName

APP = "https://app.example.com"
CORS = {
    "allow_origins": [APP],
    "allow_methods": ["post", "GET"],
    "allow_headers": ["content-type", "authorization", "x-api-key"],
    "max_age_s": 600,
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    home = tmp_path_factory.mktemp("cors") / "home"
    with module_daemon(home) as cirrus:
        apis = [
            {"name": "web", "cors": CORS},
            {"name": "anyone", "cors": {"allow_origins": ["*"]}},
            {"name": "guarded", "cors": CORS, "auth": "required"},
            {"name": "plain"},
        ]
        project = write_project(tmp_path_factory.mktemp("project"), ECHO_PREDICTOR, apis=apis)
        code, out, err = cirrus.cli("deploy", str(project))
        assert code == 0, out + err
        for api in apis:
            cirrus.wait_for(api["name"], lambda s: s.status == ApiStatusName.LIVE)
        yield cirrus


def preflight(gw: Cirrus, api: str, origin: str, method: str = "POST", headers: str = "content-type") -> httpx.Response:
    asked = {"origin": origin, "access-control-request-method": method, "access-control-request-headers": headers}
    return httpx.options(gw.url(f"/{api}"), headers=asked)


def test_a_preflight_from_an_allowed_origin_gets_the_allow_headers(gw: Cirrus) -> None:
    for api in ("web", "guarded"):  # `guarded` needs a key, but a preflight carries none
        answer = preflight(gw, api, APP, headers="content-type, x-api-key")
        assert answer.status_code == 204, answer.text
        assert answer.headers["access-control-allow-origin"] == APP
        assert answer.headers["access-control-allow-methods"] == "POST, GET"
        assert answer.headers["access-control-allow-headers"] == "content-type, authorization, x-api-key"
        assert answer.headers["access-control-max-age"] == "600"
        assert answer.headers["vary"] == "origin"
        assert "access-control-allow-credentials" not in answer.headers
    assert preflight(gw, "anyone", "https://elsewhere.example").headers["access-control-allow-origin"] == "*"


def test_a_preflight_that_is_not_allowed_gets_403(gw: Cirrus) -> None:
    for answer, why in [
        (preflight(gw, "web", "https://evil.example"), "origin"),
        (preflight(gw, "web", APP, method="DELETE"), "method"),
        (preflight(gw, "web", APP, headers="x-secret"), "x-secret"),
    ]:
        assert answer.status_code == 403 and why in answer.json()["error"]
        assert "access-control-allow-origin" not in answer.headers


def test_answers_to_an_allowed_origin_are_marked(gw: Cirrus) -> None:
    answer = httpx.post(gw.url("/web"), json={"x": 1}, headers={"origin": APP})
    assert answer.status_code == 200 and answer.json()["echo"] == {"x": 1}
    assert answer.headers["access-control-allow-origin"] == APP and answer.headers["vary"] == "origin"
    refused = httpx.post(gw.url("/guarded"), json={}, headers={"origin": APP})  # the page may read the 401
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP
    other = httpx.post(gw.url("/web"), json={}, headers={"origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    assert httpx.post(gw.url("/anyone"), json={}, headers={"origin": APP}).headers["access-control-allow-origin"] == "*"
    no_origin = httpx.post(gw.url("/web"), json={})
    assert no_origin.status_code == 200 and "access-control-allow-origin" not in no_origin.headers


def test_an_api_without_cors_answers_as_before(gw: Cirrus) -> None:
    answer = httpx.post(gw.url("/plain"), json={"x": 2}, headers={"origin": APP})
    assert answer.status_code == 200
    assert not any(k.startswith("access-control-") for k in answer.headers) and "vary" not in answer.headers
    refused = preflight(gw, "plain", APP)
    assert refused.status_code == 405 and "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize(
    ("cors", "error"),
    [
        ({"allow_origins": ["*"], "allow_credentials": True}, "allow_credentials cannot be combined"),
        ({"allow_origins": ["app.example.com"]}, "is not an origin"),
        ({"allow_origins": ["https://app.example.com/path"]}, "is not an origin"),
        ({"allow_origins": []}, "at least 1"),
        ({"allow_origins": [APP], "allow_methods": ["TRACE"]}, "allow_methods"),
        ({"allow_origins": [APP], "allow_headers": ["*"]}, "not a header name"),
        ({"allow_origins": [APP], "max_age": 5}, "max_age"),
    ],
)
def test_the_cors_spec_is_strict(cors: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        CorsSpec.model_validate(cors)


def test_the_cors_spec_normalizes() -> None:
    spec = CorsSpec.model_validate({"allow_origins": ["HTTPS://App.Example.com/"], "allow_methods": ["post"]})
    assert spec.allow_origins == [APP] and spec.allow_methods == ["POST"]
    assert CorsSpec.model_validate({"allow_origins": [APP], "allow_credentials": True}).allow_credentials
