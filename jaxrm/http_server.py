"""What jaxrm's HTTP servers share: the ASGI application over a service's routes, request
bodies within limits, errors as JSON, Prometheus counters, and the listening socket.

A service (`jaxrm serve`'s rewards, `jaxrm serve-lm`'s completions) gives `routes()`
(path -> (method, handler of the JSON body)), `authorize(header)`, `health()`,
`metrics_text()`, `metrics` (a `Metrics`) and `limits` (a `Limits`).
"""

import argparse
import asyncio
import dataclasses
import hmac
import json
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import jax
import uvicorn

from jaxrm.errors import UserError

TOKEN_ENV = "JAXRM_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DRAIN_BYTES = 256 * 2**20  # read of an oversized body before answering 413, at most
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RequestError(Exception):
    """A request the client must change: answered with `status` and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass
class Limits:
    max_items: int = 1024
    max_body_bytes: int = 32 * 2**20
    request_timeout: float = 300.0


class Metrics:
    """Counters for /metrics in Prometheus' text format, and the XLA compiles of this process."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum, self.latency_total = 0.0, 0
        self.compiles = 0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, seconds: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            with self._lock:
                self.compiles += 1

    def observe(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (path, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency_sum += seconds
            self.latency_total += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_counts[i] += 1

    def render(
        self, counters: dict[str, tuple[str, float]], gauges: dict[str, tuple[str, float]]
    ) -> str:
        """Prometheus text: requests and latency, the XLA compiles, then the server's own
        `counters` and `gauges` (name -> (help, value))."""
        lines = [
            "# HELP jaxrm_requests_total HTTP requests answered, by path and status.",
            "# TYPE jaxrm_requests_total counter",
        ]
        with self._lock:
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'jaxrm_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += [
                "# HELP jaxrm_request_seconds Time from a request's arrival to its reply.",
                "# TYPE jaxrm_request_seconds histogram",
            ]
            for bound, n in zip(LATENCY_BUCKETS, self.latency_counts, strict=True):
                lines.append(f'jaxrm_request_seconds_bucket{{le="{bound}"}} {n}')
            lines.append(f'jaxrm_request_seconds_bucket{{le="+Inf"}} {self.latency_total}')
            lines.append(f"jaxrm_request_seconds_sum {self.latency_sum}")
            lines.append(f"jaxrm_request_seconds_count {self.latency_total}")
            compiles = self.compiles
        counters = {
            **counters,
            "jaxrm_xla_compiles_total": (
                "XLA compiles in this process (0 after start-up)",
                compiles,
            ),
        }
        for name, (help_text, value) in counters.items():
            lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} counter", f"{name} {value}"]
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future,
    result: Any = None,
    error: BaseException | None = None,
) -> None:
    """Sets `future` (of `loop`) from another thread, unless it was given up (timed out)."""

    def set_it() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    loop.call_soon_threadsafe(set_it)


class Service(Protocol):
    metrics: Metrics
    limits: Limits

    def routes(self) -> dict[str, tuple[str, Callable[[dict], Awaitable[Any]] | None]]: ...

    def authorize(self, header: str | None) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...


def check_bearer(token: str | None, header: str | None) -> None:
    """Nothing when no token is required or the Authorization header carries it, else 401."""
    if token is None:
        return
    if not hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode()):
        raise RequestError(401, "missing or wrong bearer token (header Authorization)")


def check_exposure(host: str, token: str | None, allow_unauthenticated: bool) -> None:
    if host not in LOOPBACK and token is None and not allow_unauthenticated:
        raise UserError(
            f"listening on {host} without a token lets anyone who can reach it use the "
            f"model; set --token or {TOKEN_ENV}, or pass --allow-unauthenticated"
        )


def serve_forever(app: "App", sock: socket.socket, backlog: int) -> None:
    """Runs `app` on `sock` with uvicorn until SIGTERM / SIGINT, which exit cleanly."""
    config = uvicorn.Config(
        app,
        backlog=backlog,
        timeout_keep_alive=60,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn stops gracefully on SIGTERM / SIGINT and then raises the signal again for the
    # handler it found: make that one a no-op, so a requested stop exits 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run(sockets=[sock])


class App:
    """The ASGI application: routing, bodies within limits, JSON in and out."""

    def __init__(self, service: "Service", openai_errors: bool = False):
        self.service = service
        self.routes = service.routes()
        self.openai_errors = openai_errors

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path = scope["path"].rstrip("/") or "/"
        status, payload, content_type = await self._answer(scope, receive, path)
        headers = [(b"content-type", content_type.encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        known = path if path in self.routes else "other"
        self.service.metrics.observe(known, status, time.perf_counter() - started)

    async def _answer(self, scope: dict, receive: Callable, path: str) -> tuple[int, Any, str]:
        service, json_type = self.service, "application/json"
        try:
            if path not in self.routes:
                raise RequestError(404, f"no endpoint {path}; use {', '.join(self.routes)}")
            allowed, action = self.routes[path]
            if scope["method"] != allowed:
                raise RequestError(405, f"{path} takes {allowed}")
            if path == "/health":
                return 200, service.health(), json_type
            if path == "/metrics":
                return 200, service.metrics_text().encode(), "text/plain; version=0.0.4"
            headers = dict(scope["headers"])
            service.authorize(headers.get(b"authorization", b"").decode("latin-1") or None)
            assert action is not None
            body = await self._body(headers, receive) if allowed == "POST" else {}
            return 200, await action(body), json_type
        except RequestError as e:
            return e.status, self._error(e.status, e.message), json_type
        except Exception as e:
            traceback.print_exc()
            message = f"internal error: {type(e).__name__}: {e}"
            return 500, self._error(500, message), json_type

    def _error(self, status: int, message: str) -> dict[str, Any]:
        """The error body: {"error": message}, or OpenAI's {"error": {message, type, code}}."""
        if not self.openai_errors:
            return {"error": message}
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": status}}

    async def _body(self, headers: dict[bytes, bytes], receive: Callable) -> dict:
        limit = self.service.limits.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Read (and drop) what the client sends, up to a bound, so that it gets to read the
            # 413 instead of a broken pipe while it is still writing.
            await _drain(receive, min(int(declared), DRAIN_BYTES))
            raise RequestError(413, f"body of {int(declared)} bytes; at most {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client went away before sending its body")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise RequestError(413, f"body of more than {limit} bytes; at most {limit}")
            if not message.get("more_body", False):
                break
        return parse_body(b"".join(chunks))


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object of text a tokenizer can take, or a 400 saying why not."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body must be a JSON object")
    try:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(400, f"body holds a lone surrogate ({e.object[e.start]!r})") from None
    return body


async def _drain(receive: Callable, limit: int) -> None:
    size = 0
    while size < limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """The server's socket, bound and listening before the model loads, so a port in use is
    reported at once; connections that arrive while it compiles wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(backlog)
    return sock


def add_listen_options(parser: argparse.ArgumentParser) -> None:
    """Where a server listens and who may call it: the options `serve` and `serve-lm` share."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="request body, at most")
    parser.add_argument(
        "--backlog", type=int, default=2048, help="connections waiting to be accepted, at most"
    )
    parser.add_argument(
        "--token", help=f"require 'Authorization: Bearer TOKEN' (or set {TOKEN_ENV})"
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on an address other than loopback without a token",
    )


def open_listener(args: argparse.Namespace) -> tuple[socket.socket, str | None]:
    """The listening socket of `add_listen_options`' settings, and the token to require."""
    if args.max_body_mb <= 0 or args.backlog <= 0:
        raise UserError("--max-body-mb and --backlog must be > 0")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_exposure(args.host, token, args.allow_unauthenticated)
    return listen(args.host, args.port, args.backlog), token
