"""Who may call what: every route of the app's own route table — the models, completions, metrics,
jobs and files included — answers 401 in the error envelope without the right key, except
`/health` and the documentation (`/docs`, its assets, `/openapi.json`: they describe the routes and
hold no data, as the README says). Keys are compared in constant time and never logged; what a job
or an upload stored is reachable only through its routes, never by a path."""

import logging
import re

import httpx
import pytest
from conftest import settings_for
from service_fixtures import API_KEY, ServerThread
from starlette.routing import Mount, Route

import service.deps
from service.keys import create_stored_key
from worker.store import migrate

OPEN = {"/health", "/docs", "/openapi.json", "/docs-assets"}  # no data behind them
SECOND_KEY = "second-key-0123456789"


@pytest.fixture(scope="module")
def guarded(models_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("access")
    settings = settings_for(models_dir, data, api_keys=[API_KEY, SECOND_KEY])
    migrate(settings.resolved_database_url)
    with ServerThread(settings) as running:
        yield running


def every_route(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled with a name."""
    found = []
    for route in app.routes:
        if isinstance(route, Mount):
            found.append(("GET", route.path + "/swagger-ui.css"))
            continue
        # a router included with a prefix stands for its routes (FastAPI resolves them lazily)
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for context in contexts:
            assert isinstance(context, Route) or hasattr(context, "methods"), context
            for method in sorted(context.methods - {"HEAD", "OPTIONS"}):
                found.append((method, re.sub(r"\{[^}]+\}", "x", context.path)))
    return found


def test_the_route_table_is_walked_whole(guarded):
    routes = every_route(guarded.app)
    paths = {path for _, path in routes}
    for expected in ("/v1/completions", "/v1/models", "/v1/models/x", "/metrics", "/v1/jobs", "/v1/jobs/x/events",
                     "/v1/jobs/x/artifacts/x", "/v1/files", "/v1/files/x", "/health", "/docs"):
        assert expected in paths
    assert len(routes) >= 18


def test_every_route_but_health_and_the_docs_needs_a_key(guarded):
    refused = 0
    wrong_keys = [None, "", "wrong", API_KEY + "x", API_KEY[:-1], API_KEY.upper(), f"{API_KEY},{SECOND_KEY}"]
    for method, path in every_route(guarded.app):
        open_route = path in OPEN or path.startswith("/docs-assets")
        for key in wrong_keys:
            headers = {} if key is None else {"Authorization": f"Bearer {key}".strip()}
            response = httpx.request(method, guarded.url + path, headers=headers, timeout=30)
            if open_route:
                assert response.status_code == 200, (method, path, response.status_code)
                continue
            assert response.status_code == 401, (method, path, key, response.status_code, response.text[:200])
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error", error
            refused += 1
        for scheme in ("Basic", "Token", "bearer"):  # the key in another scheme is no key; `bearer` is one
            response = httpx.request(method, guarded.url + path, headers={"Authorization": f"{scheme} {API_KEY}"},
                                     timeout=30)
            assert (response.status_code == 401) == (scheme != "bearer" and not open_route), (method, path, scheme)
    assert refused >= 100


def test_either_configured_key_opens_the_guarded_routes(guarded):
    for key in (API_KEY, SECOND_KEY):
        for path in ("/v1/models", "/v1/jobs", "/v1/files", "/metrics"):
            assert httpx.get(guarded.url + path, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_keys_are_compared_in_constant_time_against_every_configured_key(guarded, monkeypatch):
    compared = []
    real = service.deps.secrets.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(service.deps.secrets, "compare_digest", spy)
    for key, status in (("wrong", 401), (API_KEY, 200), (SECOND_KEY, 200)):
        compared.clear()
        response = httpx.get(guarded.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == status
        assert len(compared) == 2  # every key, whichever matched (no early exit telling which)
        assert all(len(a) == len(b) for a, b in compared)  # digests: the key's length does not show either


def test_keys_are_never_logged_nor_echoed(models_dir, tmp_path, caplog):
    secret = "sk-do-not-log-" + "7" * 24
    settings = settings_for(models_dir, tmp_path, api_keys=[secret])
    assert secret not in repr(settings) and secret not in str(settings)
    migrate(settings.resolved_database_url)
    bodies = []
    with caplog.at_level(logging.DEBUG), ServerThread(settings) as server:
        for key in (secret, secret + "-wrong", "wrong-" + secret):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/v1/jobs/x"),
                                 ("POST", "/v1/files"), ("GET", "/nowhere")):
                response = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {key}"},
                                         json={"model": "tiny-gla", "prompt": "hi", "max_tokens": 2})
                bodies.append(response.text)
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args}" for r in caplog.records)
    assert caplog.records  # the capture works: the requests did log
    assert secret not in logged
    assert not any(secret in body for body in bodies)


def test_what_jobs_and_uploads_store_is_reachable_only_through_their_routes(guarded):
    data = guarded.app.state.settings.home
    stored_key = create_stored_key(data)  # a file in the data directory, beside the database and uploads
    auth = {"Authorization": f"Bearer {API_KEY}"}
    upload = httpx.post(guarded.url + "/v1/files", headers=auth, data={"purpose": "train"},
                        files={"file": ("notes.txt", b"private notes")}).json()
    for path in ("/api_key", "/xatl.db", "/files", f"/files/{upload['id']}", "/v1/files/../api_key",
                 "/v1/files/%2e%2e%2fapi_key", f"/v1/files/{upload['id']}/content",
                 "/v1/jobs/x/artifacts/..%2f..%2fapi_key", "/v1/jobs/x/artifacts/%2e%2e/%2e%2e/api_key",
                 "/v1/models/..%2fapi_key", "/docs-assets/../api_key", "/docs-assets/%2e%2e/%2e%2e/api_key",
                 "/v1/models/tiny-gla/config.json"):
        response = httpx.get(guarded.url + path, headers=auth)
        assert response.status_code in (400, 404, 405), (path, response.status_code)
        assert stored_key not in response.text and "private notes" not in response.text, path
