"""The web app's guards: CORS, the API token, the headers every answer carries.

The fake leader (helpers.FakeLeader, fixtures `leader`, `app`, `client` in conftest.py) stands in for
the cluster behind the app's CLIENT_FACTORY: it streams scripted tokens, answers status, and can be
switched to "down", "fails mid-reply" or "refuses the request", so each error path is checked without
starting processes.
"""
from __future__ import annotations

import pytest
from helpers import make_app

# ---------------------------------------------------------------------------------------------
# CORS and the API token


def test_cors_allows_only_configured_origins(leader):
    c = make_app(leader, CORS_ORIGINS=("https://chat.example",))
    ok = c.get("/config", headers={"Origin": "https://chat.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "Origin" in ok.headers["Vary"]
    other = c.get("/config", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers


def test_no_cors_by_default_and_never_a_wildcard(client):
    r = client.get("/config", headers={"Origin": "https://chat.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("origin", ["http://localhost:8080", "http://127.0.0.1:8080", "http://[::1]:3000",
                                    "http://localhost", "null"])
def test_cors_admits_this_machine_and_a_file_page_by_default(client, origin):
    """The page served by `python -m http.server` or opened as a file (Origin: null) reaches the API."""
    r = client.options("/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Credentials" not in r.headers
    r = client.post("/chat", json={"text": "Hi"}, headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize("origin", ["http://localhost.evil.example", "https://localhost:8080", "http://10.0.0.5:8000",
                                    "https://evil.example"])
def test_other_origins_are_not_admitted_by_default(client, origin):
    r = client.get("/config", headers={"Origin": origin})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_configured_origins_replace_the_defaults(leader):
    c = make_app(leader, CORS_ORIGINS=("https://chat.example",))
    for origin in ("http://localhost:8080", "null"):
        assert c.post("/chat", json={"text": "Hi"}, headers={"Origin": origin}).status_code == 403


@pytest.mark.parametrize("path, body", [("/chat", '{"text": "Hi"}'), ("/v1/completions", '{"prompt": "Hi"}'),
                                        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}]}'),
                                        ("/reconnect", "{}")])
def test_a_cross_site_post_is_refused_before_it_runs(client, leader, path, body):
    """A form or fetch() on another site (text/plain needs no preflight) cannot make the cluster work."""
    r = client.post(path, data=body, content_type="text/plain", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403, r.data
    message = r.json["error"]["message"] if path.startswith("/v1/") else r.json["error"]
    assert "https://evil.example" in message and "cors_origins" in message
    assert leader.calls == [] and leader.connections == []
    # the same body from a program (no Origin) or from the app's own page is served
    assert client.post(path, data=body, content_type="text/plain").status_code == 200
    own = client.post(path, data=body, content_type="text/plain", headers={"Origin": "http://localhost"})
    assert own.status_code == 200


@pytest.mark.parametrize("path", ["/", "/app.js", "/style.css", "/static/app.js", "/config", "/chat"])
def test_every_answer_says_nosniff_and_the_page_may_not_be_framed(client, path):
    r = client.get(path) if path != "/chat" else client.post("/chat", json={"text": "Hi"})
    assert r.status_code == 200, (path, r.status_code)
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    csp = dict(part.strip().split(" ", 1) for part in r.headers["Content-Security-Policy"].split(";"))
    assert csp["frame-ancestors"] == "'none'" and csp["script-src"] == "'self'" and csp["default-src"] == "'none'"


def test_preflight_needs_no_token_and_allows_the_authorization_header(leader):
    c = make_app(leader, CORS_ORIGINS=("https://chat.example",), API_TOKEN="s3cret")
    r = c.options("/chat", headers={"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert "POST" in r.headers["Access-Control-Allow-Methods"]


API_ROUTES = [("get", "/config", None), ("get", "/health", None), ("post", "/reconnect", None),
              ("get", "/metrics", None), ("post", "/chat", {"text": "Hello"}), ("get", "/v1/models", None),
              ("post", "/v1/completions", {"prompt": "Hello"}),
              ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
              ("get", "/cluster", None)]


@pytest.mark.parametrize("method, path, body", API_ROUTES)
def test_api_token_is_required_on_api_routes(leader, method, path, body):
    c = make_app(leader, API_TOKEN="s3cret")
    send = getattr(c, method)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = send(path, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        message = r.json["error"]["message"] if path.startswith("/v1/") else r.json["error"]
        assert "Authorization: Bearer <api_token>" in message
    assert send(path, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_page_is_served_without_the_token(leader):
    c = make_app(leader, API_TOKEN="s3cret")
    assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
