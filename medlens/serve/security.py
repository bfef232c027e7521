"""Access control and hardening of ``medlens serve`` (one ASGI middleware, :class:`Guard`).

Who can reach the server decides what it must do:

* **Host allow-list** - a request whose ``Host`` header is not a valid ``host[:port]`` (RFC
  9112), or not allowed, gets a 400. On a loopback address only ``localhost``/``127.0.0.1``/
  ``[::1]`` are allowed, which stops DNS rebinding (a web page whose domain resolves to
  127.0.0.1 reaching a local server).
* **API key** - with a key (``--api-key-file`` or ``MEDLENS_API_KEY``; required when binding to
  a non-loopback address unless ``--insecure-no-auth``) the API needs ``Authorization: Bearer
  KEY`` and the pages a session: ``/login`` takes the key once and sets an HttpOnly,
  SameSite=Strict cookie signed with it (HMAC-SHA256, 12 hours). Liveness/readiness probes
  and static assets stay open.
* **Origin check** - a state-changing request (POST, ...) that carries an ``Origin`` other
  than the server's own is refused (403): no web page the user visits can post to it (CSRF).
* **Rate limit** - per client address, a moving window from the ``limits`` library; past it:
  429 with ``Retry-After``.
* **Predictions in flight** - at most ``--max-connections`` prediction requests (uploads being
  read, decoded or predicted) at once per process; past it a prediction gets a 503 with
  ``Retry-After`` at once (:class:`InFlightLimit`). Connections themselves are not counted:
  a client that never finishes its request headers holds nothing the others need and is cut
  off by the header timeout, so health checks and other clients keep being answered.
* **Headers** - every response gets a Content-Security-Policy, ``X-Content-Type-Options:
  nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``; API answers and pages
  ``Cache-Control: no-store`` (they hold patient-derived data).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

from medlens.errors import UsageError

__all__ = [
    "SecurityPolicy",
    "Guard",
    "InFlightLimit",
    "read_api_key",
    "is_loopback",
    "valid_host_header",
    "allowed_hosts_for",
    "parse_rate_limit",
    "header_timeout_protocol",
    "HEADER_TIMEOUT_S",
]

SESSION_COOKIE = "medlens_session"
SESSION_SECONDS = 12 * 3600
MIN_KEY_CHARS = 16
MACHINE_PREFIXES = ("/api/", "/metrics")  # read by programs: 401, never a login redirect
OPEN_PREFIXES = ("/healthz", "/readyz", "/login", "/static/", "/vendor/", "/favicon")
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'{extra}; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
HEADER_TIMEOUT_S = 10.0  # a connection must deliver a request's headers within this


def parse_rate_limit(spec: str) -> str | None:
    """``--rate-limit``: ``"off"`` -> None; otherwise checked with the ``limits`` parser.

    Raises:
        UsageError: a spec ``limits`` cannot read.
    """
    if spec.strip().lower() in ("off", "none", "0"):
        return None
    from limits import parse_many

    try:
        parse_many(spec)
    except ValueError:
        raise UsageError(
            f"--rate-limit {spec!r}: use e.g. 30/second or '20/second;600/minute' (or off)"
        ) from None
    return spec


HEADER_TIMEOUT_ENV = "MEDLENS_HEADER_TIMEOUT"


def env_header_timeout_protocol() -> type:
    """The protocol of :func:`header_timeout_protocol` with the limit from the environment
    (``MEDLENS_HEADER_TIMEOUT``): what the worker processes of ``medlens serve --workers N``
    load by name (``medlens.serve.security:EnvHeaderTimeoutH11Protocol``)."""
    return header_timeout_protocol(float(os.environ.get(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT_S)))


def __getattr__(name: str):  # the protocol class uvicorn imports by name in its workers
    if name == "EnvHeaderTimeoutH11Protocol":
        return env_header_timeout_protocol()
    raise AttributeError(name)


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol closing a connection whose request headers have not all arrived
    ``seconds`` after it opened or after its previous answer (uvicorn itself has no such
    limit: half-sent requests would hold connections open for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._header_timeout)

        def _header_timeout(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


@dataclass
class SecurityPolicy:
    """What the :class:`Guard` enforces.

    Attributes:
        api_key: the key the API and the login page require; None: no authentication.
        allowed_hosts: accepted ``Host`` names (without port); ``"*"`` accepts any.
        rate_limit: per-client limit in the ``limits`` notation (``"30/second"``,
            ``"20/second;600/minute"``); None: no limit.
    """

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ("*",)
    rate_limit: str | None = "30/second"


def read_api_key(path: str | Path) -> str:
    """The key in ``path`` (surrounding whitespace dropped).

    Raises:
        UsageError: the file cannot be read, or the key is shorter than 16 characters.
    """
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise UsageError(f"--api-key-file {path}: cannot be read ({e.strerror})") from None
    if len(key) < MIN_KEY_CHARS:
        raise UsageError(
            f"--api-key-file {path}: the key has {len(key)} characters; use at least "
            f"{MIN_KEY_CHARS} (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return key


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server to this machine."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The default ``Host`` allow-list for a bind address, plus ``extra`` (``--allowed-host``):
    loopback names for a loopback bind; otherwise ``extra``, or any host when none is given
    (the API key then protects the server)."""
    if extra:
        return tuple(dict.fromkeys([*extra, *(LOOPBACK_HOSTS if is_loopback(bind_host) else ())]))
    if is_loopback(bind_host):
        return (*LOOPBACK_HOSTS, bind_host)
    return ("*",) if bind_host in ("0.0.0.0", "::", "") else (bind_host,)


def _host_name(value: str) -> str:
    """``Host`` header value without its port (IPv6 keeps its brackets)."""
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def session_token(key: str, expires: int) -> str:
    mac = hmac.new(key.encode(), f"session:{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def _valid_session(key: str, token: str) -> bool:
    expires, _, _ = token.partition(".")
    if not expires.isdigit() or int(expires) < time.time():
        return False
    return hmac.compare_digest(token, session_token(key, int(expires)))


def _cookie(headers: dict[bytes, bytes], name: str) -> str | None:
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


class Guard:
    """The ASGI middleware enforcing a :class:`SecurityPolicy` (see the module docstring)."""

    def __init__(self, app: Callable, policy: SecurityPolicy) -> None:
        from limits import parse_many
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.app, self.policy = app, policy
        self.limits = parse_many(policy.rate_limit) if policy.rate_limit else []
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path, method = scope["path"], scope["method"]
        send = self._with_headers(send, path)
        refusal = self._refusal(scope, headers, path, method)
        if refusal is not None:
            await _respond(send, *refusal)
            return
        if self.policy.api_key and path in ("/login", "/logout"):
            await self._login(scope, receive, send, path, method)
            return
        if self.policy.api_key and not path.startswith(OPEN_PREFIXES):
            if not self._authenticated(headers):
                await self._unauthenticated(send, path, method)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope, headers, path: str, method: str) -> tuple | None:
        """(status, detail, extra headers) for a request refused before the app, else None."""
        raw_host = headers.get(b"host", b"").decode("latin-1")
        if not valid_host_header(raw_host):
            return (
                400,
                f"the Host header {raw_host[:100]!r} is not a valid host[:port] (RFC 9112); "
                "send this server's name or address, e.g. Host: localhost:8000",
                [],
            )
        host = _host_name(raw_host)
        allowed = self.policy.allowed_hosts
        if "*" not in allowed and host not in allowed:
            return 400, f"Host {host!r} is not served here (allowed: {', '.join(allowed)})", []
        if self.limits and not path.startswith(("/static/", "/vendor/", "/healthz")):
            client = (scope.get("client") or ("unknown", 0))[0]
            for limit in self.limits:
                if not self.limiter.hit(limit, client):
                    reset = self.limiter.get_window_stats(limit, client).reset_time
                    wait = max(1, int(reset - time.time() + 0.999))
                    return (
                        429,
                        f"too many requests; retry in {wait} s",
                        [(b"retry-after", b"%d" % wait)],
                    )
        origin = headers.get(b"origin")
        if method in UNSAFE_METHODS and origin is not None:
            origin_host = origin.decode("latin-1").partition("://")[2]
            if origin_host != headers.get(b"host", b"").decode("latin-1"):
                return 403, "cross-origin request refused (its Origin is not this server)", []
        return None

    def _authenticated(self, headers: dict[bytes, bytes]) -> bool:
        key = self.policy.api_key
        assert key is not None  # only a policy with an API key authenticates
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            return hmac.compare_digest(auth[7:].strip().encode(), key.encode())
        token = _cookie(headers, SESSION_COOKIE)
        return token is not None and _valid_session(key, token)

    async def _unauthenticated(self, send, path: str, method: str) -> None:
        if path.startswith(MACHINE_PREFIXES) or method != "GET":  # machines get a 401
            await _respond(
                send,
                401,
                "authentication required: send `Authorization: Bearer <API key>`",
                [(b"www-authenticate", b'Bearer realm="medlens"')],
            )
        else:
            location = f"/login?next={quote(path)}".encode()
            await _respond(send, 303, "log in first", [(b"location", location)])

    async def _login(self, scope, receive, send, path: str, method: str) -> None:
        if path == "/logout":
            clear = f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
            await _respond(send, 303, "logged out", [(b"location", b"/login"),
                                                      (b"set-cookie", clear.encode())])  # fmt: skip
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        target = _safe_next(query.get("next", ["/"])[0])
        if method != "POST":
            await _html(send, 200, _login_page(target, error=False))
            return
        form = parse_qs((await _body(receive, 4096)).decode("utf-8", "replace"))
        given = (form.get("key") or [""])[0].strip()
        key = self.policy.api_key
        assert key is not None  # only a policy with an API key has a login page
        if not hmac.compare_digest(given.encode(), key.encode()):
            await _html(send, 401, _login_page(target, error=True))
            return
        expires = int(time.time()) + SESSION_SECONDS
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = (
            f"{SESSION_COOKIE}={session_token(key, expires)}; Path=/; "
            f"Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict{secure}"
        )
        await _respond(send, 303, "logged in", [(b"location", target.encode()),
                                                 (b"set-cookie", cookie.encode())])  # fmt: skip

    def _with_headers(self, send, path: str):
        """``send`` adding the security headers to the response start (and no server banner)."""
        csp = CSP.format(extra=" 'unsafe-inline'" if path == "/docs" else "").encode()
        static = path.startswith(("/static/", "/vendor/"))

        async def wrapped(message) -> None:
            if message["type"] == "http.response.start":
                drop = {b"server", b"x-frame-options", b"content-security-policy"}
                hs = [(k, v) for k, v in message.get("headers", []) if k.lower() not in drop]
                hs += [
                    (b"content-security-policy", csp),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                if not static:
                    hs.append((b"cache-control", b"no-store"))
                message = {**message, "headers": hs}
            await send(message)

        return wrapped


class InFlightLimit:
    """ASGI middleware: at most ``limit`` prediction requests in the app at once; more get a
    503 with ``Retry-After: 1`` before their upload is read.

    This bounds the memory held by uploads in flight (``limit`` times the upload limit). It
    replaces uvicorn's ``limit_concurrency``, which counts open connections too: sockets that
    never finish their headers used to turn every request, ``/healthz`` included, into a 503
    until the header timeout. The count needs no lock: the event loop runs one coroutine at a
    time.
    """

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit, self.in_flight = app, max(1, int(limit)), 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not _is_prediction(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await _respond(
                send,
                503,
                f"the server is busy: {self.limit} predictions are in progress (its "
                "--max-connections limit); retry in a moment",
                [(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _is_prediction(scope) -> bool:
    """A request that carries an upload to predict on (``POST /api/v1/models/NAME/predict``)."""
    return (
        scope["method"] == "POST"
        and scope["path"].startswith("/api/")
        and (scope["path"].rstrip("/").endswith("/predict"))
    )


def _safe_next(target: str) -> str:
    """A login's destination: ``target`` when it is a plain path on this server, else ``/``.

    Browsers forgive a lot in a ``Location``: they read a backslash as a slash and drop tabs
    and newlines, so ``/\\evil.example`` and ``/<TAB>/evil.example`` lead to ``//evil.example``,
    another site; a CR or LF would split the header. Accepted: printable ASCII starting with
    one ``/`` (not ``//``), with no backslash, whitespace or control character, and still so
    once percent-decoded (as often as it decodes, up to three times).
    """
    text = target
    for _ in range(4):
        if not _plain_path(text):
            return "/"
        decoded = unquote(text)
        if decoded == text:
            return target
        text = decoded
    return "/"  # still decoding after three rounds: nothing a page of ours links to


def _plain_path(text: str) -> bool:
    return (
        text.startswith("/")
        and not text.startswith("//")
        and "\\" not in text
        and all("\x21" <= c <= "\x7e" for c in text)
    )


# RFC 3986 host: IP-literal / IPv4address / reg-name, then an optional port of digits.
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_PORT = re.compile(r"[0-9]*")


def valid_host_header(value: str) -> bool:
    """Whether ``value`` is a syntactically valid ``Host`` header (``host[:port]``; RFC 9110
    7.2, RFC 3986 3.2.2): a registered name, an IPv4 address or a bracketed IPv6 address,
    and a port of digits. ``127.0.0.1:80@evil.example`` is not (RFC 9112 3.2: answer 400)."""
    if value.startswith("["):
        literal, sep, rest = value[1:].partition("]")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return bool(sep) and (rest == "" or (rest[:1] == ":" and bool(_PORT.fullmatch(rest[1:]))))
    host, _, port = value.partition(":")
    return bool(_REG_NAME.fullmatch(host)) and (":" not in value or bool(_PORT.fullmatch(port)))


async def _body(receive, limit: int) -> bytes:
    data = b""
    while True:
        message = await receive()
        data += message.get("body", b"")
        if len(data) > limit or not message.get("more_body"):
            return data[:limit]


async def _respond(send, status: int, detail: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})


async def _html(send, status: int, page: str) -> None:
    body = page.encode()
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _login_page(target: str, error: bool) -> str:
    from html import escape

    message = '<p class="error" role="alert">That key is not right.</p>' if error else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>MedLens: log in'
        '</title><link rel="stylesheet" href="/static/medlens.css"></head><body><main>'
        "<h1>MedLens</h1><p>This server requires its access key.</p>"
        f'{message}<form method="post" action="/login?next={escape(quote(target))}">'
        '<label for="key">Access key</label> <input id="key" name="key" type="password" '
        'autocomplete="current-password" required autofocus> <button type="submit">Log in'
        "</button></form></main></body></html>"
    )
