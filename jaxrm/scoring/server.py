"""`jaxrm serve CHECKPOINT`: the reward model behind HTTP, for RL frameworks.

    POST /get_reward  {"query": [text, ...]}              -> {"rewards": [...], "scores": [...]}
    POST /score       {"items": [{"prompt", "reference"?, "response"}, ...]} -> {"rewards": [...]}
    GET  /health                                           -> {"status": "ok", ...counters}

/get_reward is OpenRLHF's remote reward model API: each text is already formatted (for POLAR:
prompt + reference + "<|reward|>" + prompt + output); the server adds BOS and the reward token,
and a text longer than data.max_length loses its start (its index is listed in "truncated").
/score formats each item with the checkpoint's own template, exactly as `jaxrm score` does.

Requests are answered by one thread each; their sequences go to a single batcher thread that
waits up to --max-wait-ms for more requests, scores up to --max-batch sequences together on the
model (length-bucketed, see jaxrm/scoring/scorer.py) and hands each request its rewards. Limits: bodies
over --max-body-mb get 413, requests with more than --max-items texts 413, malformed JSON or
fields 400 (with the reason), a missing or wrong bearer token 401 (when --token or the
JAXRM_SERVE_TOKEN environment variable sets one), a full queue 503. The server binds to 127.0.0.1
unless --host says otherwise. SIGTERM / SIGINT stop it.
"""

import argparse
import dataclasses
import hmac
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from jaxrm.errors import UserError
from jaxrm.scoring.scorer import Scorer, add_scorer_options, open_scorer

TOKEN_ENV = "JAXRM_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass
class Job:
    sequences: list[np.ndarray]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    rewards: np.ndarray | None = None
    error: str | None = None


class Batcher:
    """Scores the sequences of concurrent requests together, on one thread."""

    def __init__(self, scorer: Scorer, max_batch: int, max_wait: float, max_queue: int = 1024):
        self.scorer, self.max_batch, self.max_wait = scorer, max_batch, max_wait
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.counts = {"requests": 0, "sequences": 0, "batches": 0, "largest_batch": 0}
        self._held: Job | None = None  # taken from the queue but too big for the last batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxrm-batcher", daemon=True)
        self._thread.start()

    def submit(self, sequences: list[np.ndarray], timeout: float) -> np.ndarray:
        job = Job(sequences)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise HttpError(503, "the server is busy; retry later") from None
        if not job.done.wait(timeout):
            raise HttpError(503, f"no rewards within {timeout:g} s; retry later")
        if job.error is not None:
            raise HttpError(500, f"scoring failed: {job.error}")
        assert job.rewards is not None
        return job.rewards

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._gather()
            if jobs:
                self._score(jobs)

    def _gather(self) -> list[Job]:
        """The next batch: the first waiting request, then those arriving within max_wait."""
        first, self._held = self._held, None
        if first is None:
            try:
                first = self.jobs.get(timeout=0.1)
            except queue.Empty:
                return []
        jobs, size = [first], len(first.sequences)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if size + len(job.sequences) > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            size += len(job.sequences)
        return jobs

    def _score(self, jobs: list[Job]) -> None:
        sequences = [s for job in jobs for s in job.sequences]
        try:
            rewards = self.scorer.rewards(sequences)
        except Exception as e:  # a bug, not the client's: answer 500 and keep serving
            traceback.print_exc()
            for job in jobs:
                job.error = f"{type(e).__name__}: {e}"
                job.done.set()
            return
        start = 0
        for job in jobs:
            job.rewards = rewards[start : start + len(job.sequences)]
            start += len(job.sequences)
            job.done.set()
        self.counts["requests"] += len(jobs)
        self.counts["sequences"] += len(sequences)
        self.counts["batches"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(sequences))


@dataclasses.dataclass
class Limits:
    max_items: int = 1024
    max_body_bytes: int = 32 * 2**20
    request_timeout: float = 300.0


class RewardService:
    """What the endpoints do, apart from HTTP."""

    def __init__(self, scorer: Scorer, batcher: Batcher, limits: Limits, token: str | None):
        self.scorer, self.batcher, self.limits, self.token = scorer, batcher, limits, token
        self.truncated = 0
        self._template_lock = threading.Lock()  # tokenizers are not promised to be thread-safe

    def authorize(self, header: str | None) -> None:
        if self.token is None:
            return
        if not hmac.compare_digest((header or "").encode(), f"Bearer {self.token}".encode()):
            raise HttpError(401, "missing or wrong bearer token (header Authorization)")

    def get_reward(self, body: dict) -> dict[str, Any]:
        texts = self._list(body, "query", "texts")
        if not all(isinstance(t, str) for t in texts):
            bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
            raise HttpError(400, f"query[{bad}] must be a string")
        with self._template_lock:
            encoded = [self.scorer.text_sequence(t) for t in texts]
        truncated = [i for i, (_, cut) in enumerate(encoded) if cut]
        self.truncated += len(truncated)
        rewards = self._rewards([tokens for tokens, _ in encoded])
        return {"rewards": rewards, "scores": rewards, "truncated": truncated}

    def score(self, body: dict) -> dict[str, Any]:
        items = self._list(body, "items", "{prompt, reference?, response} objects")
        try:
            with self._template_lock:
                sequences = [
                    self.scorer.score_sequence(self.scorer.check_score_row(item, f"items[{i}]"))
                    for i, item in enumerate(items)
                ]
        except UserError as e:
            raise HttpError(400, str(e)) from None
        return {"rewards": self._rewards(sequences)}

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "objective": self.scorer.objective,
            "max_length": self.scorer.max_length,
            **self.batcher.counts,
            "truncated": self.truncated,
            "waiting": self.batcher.jobs.qsize(),
        }

    def _list(self, body: dict, field: str, what: str) -> list:
        values = body.get(field)
        if not isinstance(values, list):
            raise HttpError(400, f"field '{field}' must be a list of {what}")
        if len(values) > self.limits.max_items:
            raise HttpError(
                413, f"{len(values)} {field}; at most {self.limits.max_items} per request"
            )
        return values

    def _rewards(self, sequences: list[np.ndarray]) -> list[float]:
        if not sequences:
            return []
        return self.batcher.submit(sequences, self.limits.request_timeout).tolist()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "jaxrm"
    timeout = 60  # seconds a client may take to send its request
    service: RewardService  # set on the subclass made for each server
    _read_body = False

    def do_GET(self) -> None:
        self._respond("GET")

    def do_POST(self) -> None:
        self._respond("POST")

    def _respond(self, method: str) -> None:
        routes = {
            "/health": ("GET", None),
            "/get_reward": ("POST", self.service.get_reward),
            "/score": ("POST", self.service.score),
        }
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path not in routes:
                raise HttpError(404, f"no endpoint {path}; use {', '.join(routes)}")
            allowed, action = routes[path]
            if method != allowed:
                raise HttpError(405, f"{path} takes {allowed}")
            if action is None:
                self._send(200, self.service.health())
                return
            self.service.authorize(self.headers.get("Authorization"))
            self._send(200, action(self._body()))
        except HttpError as e:
            self._send(e.status, {"error": e.message})
        except Exception as e:
            traceback.print_exc()
            self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HttpError(411, "a Content-Length header is required")
        if int(length) > self.service.limits.max_body_bytes:
            raise HttpError(
                413, f"body of {length} bytes; at most {self.service.limits.max_body_bytes}"
            )
        raw = self.rfile.read(int(length))
        self._read_body = True
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        return body

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.command == "POST" and not getattr(self, "_read_body", False):
            self.send_header("Connection", "close")  # its unread body would follow
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self._read_body = False

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown an RL run's logs; /health has the counts


def make_server(service: RewardService, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def cmd_serve(args: argparse.Namespace) -> None:
    if min(args.max_batch, args.max_items, args.max_body_mb, args.request_timeout) <= 0:
        raise UserError("--max-batch, --max-items, --max-body-mb and --request-timeout must be > 0")
    if args.max_wait_ms < 0:
        raise UserError("--max-wait-ms must be >= 0")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.host not in LOOPBACK and token is None:
        print(
            f"jaxrm serve: warning: listening on {args.host} without a token; anyone who can "
            f"reach it can use it (set {TOKEN_ENV})",
            file=sys.stderr,
        )
    scorer = open_scorer(args)
    scorer.rewards([np.full(8, scorer.template.reward_id, np.int32)])  # compile before serving
    batcher = Batcher(scorer, args.max_batch, args.max_wait_ms / 1000)
    limits = Limits(args.max_items, int(args.max_body_mb * 2**20), args.request_timeout)
    try:
        server = make_server(RewardService(scorer, batcher, limits, token), args.host, args.port)
    except OSError as e:
        batcher.stop()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="jaxrm-http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    print(f"jaxrm serve: {scorer.objective} reward model on http://{host}:{port}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    batcher.stop()
    print("jaxrm serve: stopped", flush=True)


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    serve = commands.add_parser(
        "serve",
        help="HTTP reward server (OpenRLHF /get_reward, /score, /health)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_scorer_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--max-batch", type=int, default=64, help="sequences scored together")
    serve.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests"
    )
    serve.add_argument("--max-items", type=int, default=1024, help="texts per request, at most")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="request body, at most")
    serve.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds a request waits for rewards"
    )
    serve.add_argument(
        "--token", help=f"require 'Authorization: Bearer TOKEN' (or set {TOKEN_ENV})"
    )
    serve.set_defaults(run=cmd_serve)
