"""Access control and hardening of ``medlens serve`` (issue 13): API key and login, Host
allow-list, Origin check, rate limit, security headers; and, on a real uvicorn server, no
banner and a header-read timeout. Issue #23: half-sent connections lock no one out (item 4),
no open redirect after login (item 5), a malformed Host header is a 400 (item 6)."""

from __future__ import annotations

import asyncio
import io
import socket
import time

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_fixtures import (
    BINARY,
    MULTI,
    encode,
    save_untrained_multiclass,
    served_models,  # noqa: F401 - fixture
)

from medlens.cli import main
from medlens.serve import create_app
from medlens.serve.security import (
    SESSION_COOKIE,
    InFlightLimit,
    SecurityPolicy,
    _safe_next,
    allowed_hosts_for,
    valid_host_header,
)

KEY = "k" * 12 + "-secret-key-123"
PREDICT = f"/api/v1/models/{BINARY}/predict"


def tiny_png() -> bytes:
    return encode(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))))


@pytest.fixture(scope="module")
def secured(served_models):  # noqa: F811
    policy = SecurityPolicy(api_key=KEY, allowed_hosts=("testserver",), rate_limit=None)
    with TestClient(create_app([served_models], bundled=False, security=policy)) as c:
        yield c


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_the_api_needs_the_key(secured):
    r = secured.get("/api/v1/models")
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert secured.get("/api/v1/models", headers=_auth("wrong-key-wrong-key")).status_code == 401
    r = secured.get("/api/v1/models", headers=_auth())
    assert r.status_code == 200 and BINARY in [m["name"] for m in r.json()]
    r = secured.post(PREDICT, files={"file": ("a.png", tiny_png())}, headers=_auth())
    assert r.status_code == 200 and r.json()["label"]
    # Probes and static assets stay open.
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/static/medlens.css").status_code == 200


def test_the_pages_need_a_login_session(secured):
    r = secured.get("/dashboard", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/dashboard"
    page = secured.get("/login?next=/dashboard")
    assert page.status_code == 200 and 'type="password"' in page.text
    bad = secured.post("/login?next=/dashboard", data={"key": "nope"}, follow_redirects=False)
    assert bad.status_code == 401 and "not right" in bad.text
    ok = secured.post("/login?next=/dashboard", data={"key": KEY}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/dashboard"
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith(SESSION_COOKIE) and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    token = cookie.split(";")[0].split("=", 1)[1]

    def get(path, value):
        secured.cookies.clear()
        secured.cookies.set(SESSION_COOKIE, value)
        try:
            return secured.get(path, follow_redirects=False)
        finally:
            secured.cookies.clear()

    assert get("/", token).status_code == 200
    assert get("/api/v1/models", token).status_code == 200  # the page's JS
    assert get("/", token[:-4] + "0000").status_code == 303  # forged
    assert get("/", "1." + token.split(".")[1]).status_code == 303  # expired
    # The destination after login is only ever a local path.
    r = secured.post("/login?next=//evil.example/x", data={"key": KEY}, follow_redirects=False)
    assert r.headers["location"] == "/"
    out = secured.post("/logout", follow_redirects=False)
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]


def test_hosts_origins_and_headers(secured):
    r = secured.get("/healthz", headers={"Host": "evil.example"})
    assert r.status_code == 400 and "evil.example" in r.json()["detail"]
    r = secured.post(
        PREDICT,
        files={"file": ("a.png", tiny_png())},
        headers={**_auth(), "Origin": "http://evil.example"},
    )
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = secured.post(
        PREDICT,
        files={"file": ("a.png", tiny_png())},
        headers={**_auth(), "Origin": "http://testserver"},
    )
    assert r.status_code == 200
    for path in ("/healthz", "/login", "/api/v1/models"):
        h = secured.get(path).headers
        assert "default-src 'self'" in h["content-security-policy"]
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY"
        assert h["referrer-policy"] == "no-referrer" and h["cache-control"] == "no-store"
    assert "'unsafe-inline'" in secured.get("/docs").headers["content-security-policy"]


def test_the_rate_limit_answers_429_with_retry_after(served_models):  # noqa: F811
    policy = SecurityPolicy(allowed_hosts=("testserver",), rate_limit="5/minute")
    with TestClient(create_app([served_models], bundled=False, security=policy)) as c:
        codes = [c.get("/api/v1/models").status_code for _ in range(8)]
        assert codes == [200] * 5 + [429] * 3
        r = c.get("/api/v1/models")
        assert r.status_code == 429 and "too many requests" in r.json()["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert c.get("/healthz").status_code == 200  # probes are not limited


def test_default_host_allow_lists():
    assert "localhost" in allowed_hosts_for("127.0.0.1")
    assert "evil.example" not in allowed_hosts_for("127.0.0.1")
    assert allowed_hosts_for("0.0.0.0") == ("*",)
    assert allowed_hosts_for("0.0.0.0", ["ml.hospital.example"]) == ("ml.hospital.example",)
    assert allowed_hosts_for("10.1.2.3") == ("10.1.2.3",)


def test_serve_refuses_the_network_without_a_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDLENS_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--no-bundled"]) == 2
    err = capsys.readouterr().err
    assert "--api-key-file" in err and "--insecure-no-auth" in err
    short = tmp_path / "key"
    short.write_text("short\n")
    assert main(["serve", "--host", "0.0.0.0", "--api-key-file", str(short)]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", "--rate-limit", "lots", "--no-bundled"]) == 2
    assert "--rate-limit 'lots'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def live_server(served_models, tmp_path_factory):  # noqa: F811
    """A real `medlens serve` (uvicorn) with a key and a 1 s header timeout."""
    from medlens.bench import running_server

    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(KEY)
    extra = ("--api-key-file", str(key_file), "--header-timeout", "1", "--log-level", "warning")
    with running_server(served_models, *extra, start_timeout=120) as srv:
        yield srv.port, f"http://127.0.0.1:{srv.port}"


@pytest.mark.slow
def test_a_real_server_has_no_banner_and_needs_the_key(live_server):
    port, url = live_server
    r = httpx2.get(url + "/api/v1/models")
    assert r.status_code == 401 and "server" not in r.headers
    assert "content-security-policy" in r.headers
    r = httpx2.get(url + "/api/v1/models", headers=_auth())
    assert r.status_code == 200 and "server" not in r.headers
    r = httpx2.get(url + "/healthz", headers={"Host": "rebound.evil.example"})
    assert r.status_code == 400  # DNS rebinding: another name pointing at 127.0.0.1


@pytest.mark.slow
def test_half_sent_request_headers_are_cut_off(live_server):
    port, url = live_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        t0 = time.perf_counter()
        assert s.recv(1024) == b""  # closed by the server, no answer
        assert 0.5 < time.perf_counter() - t0 < 5
    assert httpx2.get(url + "/healthz").status_code == 200  # and it keeps serving


# ------------------------------------------------------- issue #23 item 4: half-sent connections


def _asgi_status(app, method: str, path: str) -> asyncio.Future:
    async def call() -> int:
        status = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        scope = {"type": "http", "method": method, "path": path, "headers": []}
        await app(scope, receive, send)
        return status[0]

    return call()


def test_the_in_flight_limit_refuses_only_predictions_over_it():
    async def main():
        release = asyncio.Event()

        async def app(scope, receive, send):
            if scope["path"].endswith("/predict"):
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        limited = InFlightLimit(app, limit=2)
        predict = "/api/v1/models/x/predict"
        held = [asyncio.create_task(_asgi_status(limited, "POST", predict)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert limited.in_flight == 2
        assert await _asgi_status(limited, "POST", predict) == 503  # over the limit
        assert await _asgi_status(limited, "GET", "/healthz") == 200  # never counted
        assert await _asgi_status(limited, "GET", "/api/v1/models") == 200
        release.set()
        assert [await t for t in held] == [200, 200]
        assert limited.in_flight == 0
        assert await _asgi_status(limited, "POST", predict) == 200

    asyncio.run(main())


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A folder holding one untrained three-class model (nothing to train: the server's
    behaviour is under test, not its predictions)."""
    root = tmp_path_factory.mktemp("untrained") / "models"
    save_untrained_multiclass(root / MULTI)
    return root


@pytest.mark.slow
def test_half_sent_connections_do_not_lock_clients_out(untrained):
    """70 sockets that never finish their request line, on a real `medlens serve` with the
    default limit of 64 and a 30 s header timeout: /healthz and a prediction are answered."""
    from medlens.bench import running_server

    png = io.BytesIO()
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(png, format="PNG")
    extra = ("--header-timeout", "30", "--log-level", "warning")
    with running_server(untrained, *extra, start_timeout=180) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        slow = []
        try:
            for _ in range(70):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                s.sendall(b"GET /healthz HTT")
                slow.append(s)
            time.sleep(0.5)  # the server has accepted them all
            t0 = time.perf_counter()
            with httpx2.Client(timeout=20) as c:
                assert c.get(url + "/healthz").status_code == 200
                r = c.post(
                    f"{url}/api/v1/models/{MULTI}/predict",
                    files={"file": ("x.png", png.getvalue())},
                )
                assert r.status_code == 200, r.text
                r = c.get(url + "/healthz", headers={"Host": "127.0.0.1:80@evil.example"})
                assert r.status_code == 400  # item 6, on the real server
            assert time.perf_counter() - t0 < 15
            slow[0].setblocking(False)
            with pytest.raises(BlockingIOError):  # still open, waiting: nothing was answered
                slow[0].recv(1)
        finally:
            for s in slow:
                s.close()


# ------------------------------------------------------- issue #23 item 5: redirect after login


@pytest.fixture(scope="module")
def loopback():
    """The loopback policy of `medlens serve` with a key (TestClient's own name added)."""
    policy = SecurityPolicy(
        api_key=KEY, allowed_hosts=allowed_hosts_for("127.0.0.1", ["testserver"]), rate_limit=None
    )
    with TestClient(create_app([], bundled=False, security=policy)) as c:
        yield c


OFF_SITE = [
    "/%5Cevil.example",  # /\evil.example: browsers read the backslash as a slash
    "/%09/evil.example",  # a tab, dropped by browsers: //evil.example
    "/%0A/evil.example",
    "/%0D%0ASet-Cookie:%20medlens_session=x",  # header splitting
    "%2F%2Fevil.example",
    "/%252F%252Fevil.example",  # encoded twice
    "/%255Cevil.example",
    "https://evil.example/",
    "/%20/evil.example",
    "/%E3%80%80evil",  # a non-ASCII (ideographic) space
]


@pytest.mark.parametrize("query", OFF_SITE)
def test_login_never_redirects_off_site(loopback, query):
    r = loopback.post(f"/login?next={query}", data={"key": KEY}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    page = loopback.get(f"/login?next={query}")
    assert page.status_code == 200 and "evil" not in page.text and "Set-Cookie" not in page.text


@pytest.mark.parametrize(
    "target", ["/dashboard", "/?model=chest", "/dashboard#top", "/?model=a%2Fb"]
)
def test_login_keeps_a_plain_local_destination(loopback, target):
    from urllib.parse import quote

    r = loopback.post(f"/login?next={quote(target)}", data={"key": KEY}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == target


@pytest.mark.parametrize(
    "target",
    ["/\\evil.example", "/\t/evil.example", "/%09/evil.example", "//evil.example", "/a\r\nX: y",
     "/%2f%2fevil", "", "evil.example", "/\x7f", "/é"],
)  # fmt: skip
def test_safe_next_accepts_only_plain_paths(target):
    assert _safe_next(target) == "/"


# ------------------------------------------------------- issue #23 item 6: Host syntax


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:80@evil.example", "localhost:80@evil.example", "localhost:8o", "[::1",
     "[nope]:80", "127.0.0.1:80:81", "local host", "localhost/x", "evil.example\\@localhost"],
)  # fmt: skip
def test_an_invalid_host_header_is_a_400(loopback, host):
    assert not valid_host_header(host)
    r = loopback.get("/healthz", headers={"Host": host})
    assert r.status_code == 400 and "not a valid host[:port]" in r.json()["detail"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"])
def test_a_valid_allowed_host_is_served(loopback, host):
    assert valid_host_header(host)
    assert loopback.get("/healthz", headers={"Host": host}).status_code == 200


def test_an_invalid_host_is_a_400_even_when_any_host_is_allowed():
    policy = SecurityPolicy(allowed_hosts=("*",), rate_limit=None)
    with TestClient(create_app([], bundled=False, security=policy)) as c:
        assert c.get("/healthz", headers={"Host": "a:1@b"}).status_code == 400
        assert c.get("/healthz", headers={"Host": "ml.hospital.example"}).status_code == 200
