"""`jaxrm serve CHECKPOINT`: the reward model behind HTTP, for RL frameworks and their engines.

    POST /score         {"items": [{"prompt", "reference"?, "response"}, ...]} -> {"rewards"}
    POST /score_groups  {"groups": [{"prompt", "reference"?, "responses": [...]}, ...]}
                        -> {"rewards": [[...], ...], "normalized": [[...], ...]}
    POST /get_reward    OpenRLHF: {"query": [text, ...]} -> {"rewards", "scores", ...}
    POST /pooling       vLLM (or lmdeploy with --pooling lmdeploy): {"input": ...}
    POST /classify      vLLM {"input": ...} or SGLang {"text" | "input_ids": ...} (told apart
                        by the field), also at /encode (SGLang's name)
    POST /v1/embeddings SGLang's reward form: {"input": ...} -> data[i].embedding = [reward]
    POST /tokenize      vLLM: {"prompt", "add_special_tokens"?} -> {"tokens", "count", ...}
    GET  /v1/models, /health, /metrics (Prometheus text)

/score and /score_groups format each item with the checkpoint's own template, exactly as
`jaxrm score` does; a group's shared prefix (POLAR: prompt + reference + prompt) is computed once
and its rewards come back raw and group-normalised ((r - mean) / (std + 1e-6), GRPO's). The
other endpoints take texts already formatted (for POLAR: prompt + "\\n" + reference +
"<|reward|>" + prompt + "\\n" + output) or token ids: BOS is added to a text unless it starts
with it, and the reward token is appended unless the input ends with it; the reply lists which
inputs got one (`reward_token_added`) and which lost their start for being longer than
data.max_length (`truncated`). The `model` field of a request is not checked (SGLang's habit):
one server serves one model, named by --served-model-name.

Start-up compiles every batch shape the server will ever run (rows x length buckets, see
jaxrm/scoring/scorer.py) before it prints its address, keeping compiled programs in the
persistent cache --compile-cache, so a restart is quick and no request waits on a compile.
Requests wait up to --max-wait-ms for others to fill a batch (up to --batch-tokens tokens per
device). Limits: bodies over --max-body-mb get 413, more than --max-items inputs 413, malformed
JSON or fields 400 (with the reason), a missing or wrong bearer token 401 (when --token or
JAXRM_SERVE_TOKEN sets one; /health and /metrics are open), more than --max-queue requests
waiting 503. HTTP is uvicorn's (keep-alive, a listen backlog of --backlog connections). The
server binds to 127.0.0.1 unless --host says otherwise, and another address needs a token or
--allow-unauthenticated. SIGTERM / SIGINT stop it.
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import uvicorn
from tqdm import tqdm

from jaxrm.errors import UserError
from jaxrm.scoring import protocols
from jaxrm.scoring.protocols import RequestError, Scored
from jaxrm.scoring.scorer import Groups, Row, Scorer, add_scorer_options, open_scorer
from jaxrm.storage import add_compile_cache_option, use_compile_cache

TOKEN_ENV = "JAXRM_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DRAIN_BYTES = 256 * 2**20  # read of an oversized body before answering 413, at most
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclasses.dataclass
class Job:
    rows: list[Row]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():  # the request timed out meanwhile
                return
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

        self.loop.call_soon_threadsafe(settle)


class Batcher:
    """Scores the rows of concurrent requests together, on one thread."""

    def __init__(self, scorer: Scorer, max_batch: int, max_wait: float, max_queue: int):
        self.scorer, self.max_batch, self.max_wait = scorer, max_batch, max_wait
        self.max_tokens = scorer.grid.batch_tokens * scorer.grid.row_multiple
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.counts = {"requests": 0, "sequences": 0, "batches": 0, "largest_batch": 0}
        self._held: Job | None = None  # taken from the queue but too big for the last batch
        self._lock = threading.Lock()
        self.incoming = 0  # requests announced but not yet submitted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxrm-batcher", daemon=True)
        self._thread.start()

    async def submit(self, rows: list[Row], timeout: float) -> list[np.ndarray]:
        """The reward head at every position of each row, once the batcher got to them."""
        if not rows:
            return []
        loop = asyncio.get_running_loop()
        job = Job(rows, loop.create_future(), loop)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, "the server is busy; retry later") from None
        try:
            return await asyncio.wait_for(job.future, timeout)
        except TimeoutError:
            raise RequestError(503, f"no rewards within {timeout:g} s; retry later") from None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._gather()
            if jobs:
                self._score(jobs)

    @contextlib.contextmanager
    def announced(self) -> Iterator[None]:
        """Marks a request on its way to `submit` (being read or templated): a batch being
        gathered waits for it, up to max_wait, rather than leave it for the next one."""
        with self._lock:
            self.incoming += 1
        try:
            yield
        finally:
            with self._lock:
                self.incoming -= 1

    def _gather(self) -> list[Job]:
        """The next batch: the first waiting request and every one queued or on its way within
        max_wait, until the batch holds max_batch sequences or a device batch's worth of tokens.
        With nothing queued and nothing on its way, the batch starts at once."""
        first, self._held = self._held, None
        if first is None:
            try:
                first = self.jobs.get(timeout=0.1)
            except queue.Empty:
                return []
        jobs, rows, tokens = [first], len(first.rows), sum(len(r) for r in first.rows)
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch and tokens < self.max_tokens:
            left = deadline - time.monotonic()
            if left <= 0 or (self.jobs.empty() and not self.incoming):
                break
            try:
                job = self.jobs.get(timeout=min(left, 0.001))
            except queue.Empty:
                continue
            if rows + len(job.rows) > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            rows += len(job.rows)
            tokens += sum(len(r) for r in job.rows)
        return jobs

    def _score(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        try:
            values = self.scorer.row_rewards(rows)
        except Exception as e:  # a bug, not the client's: answer 500 and keep serving
            traceback.print_exc()
            for job in jobs:
                job.finish(error=RequestError(500, f"scoring failed: {type(e).__name__}: {e}"))
            return
        start = 0
        for job in jobs:
            job.finish(values[start : start + len(job.rows)])
            start += len(job.rows)
        self.counts["requests"] += len(jobs)
        self.counts["sequences"] += sum(len(r.ends) for r in rows)
        self.counts["batches"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(rows))


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

    def render(self, batcher: Batcher, scorer: Scorer, truncated: int, added: int) -> str:
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
            "jaxrm_sequences_total": ("sequences scored", batcher.counts["sequences"]),
            "jaxrm_batches_total": ("batches run on the model", batcher.counts["batches"]),
            "jaxrm_tokens_total": ("tokens scored, padding excluded", scorer.counts.tokens),
            "jaxrm_padded_tokens_total": ("tokens computed", scorer.counts.padded_tokens),
            "jaxrm_truncated_total": ("inputs longer than data.max_length", truncated),
            "jaxrm_reward_token_added_total": ("inputs the reward token was appended to", added),
            "jaxrm_xla_compiles_total": (
                "XLA compiles in this process (0 after start-up)",
                compiles,
            ),
        }
        for name, (help_text, value) in counters.items():
            lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} counter", f"{name} {value}"]
        lines += [
            "# HELP jaxrm_waiting_requests Requests queued for the batcher.",
            "# TYPE jaxrm_waiting_requests gauge",
            f"jaxrm_waiting_requests {batcher.jobs.qsize()}",
        ]
        return "\n".join(lines) + "\n"


class RewardService:
    """What the endpoints do, apart from HTTP."""

    def __init__(
        self,
        scorer: Scorer,
        batcher: Batcher,
        limits: Limits,
        token: str | None,
        name: str,
        pooling: str,
    ):
        self.scorer, self.batcher, self.limits, self.token = scorer, batcher, limits, token
        self.name, self.pooling = name, pooling
        self.metrics = Metrics()
        self.truncated = self.reward_token_added = 0
        # Tokenizers are not promised to be thread-safe: one thread templates, off the event loop.
        self._templater = concurrent.futures.ThreadPoolExecutor(1, "jaxrm-template")

    def routes(self) -> dict[str, tuple[str, Callable[[dict], Awaitable[Any]] | None]]:
        return {
            "/health": ("GET", None),
            "/metrics": ("GET", None),
            "/v1/models": ("GET", self.models),
            "/score": ("POST", self.score),
            "/score_groups": ("POST", self.score_groups),
            "/get_reward": ("POST", self.get_reward),
            "/pooling": ("POST", self.pooling_endpoint),
            "/classify": ("POST", self.classify),
            "/encode": ("POST", self.classify),
            "/v1/embeddings": ("POST", self.embeddings),
            "/tokenize": ("POST", self.tokenize),
        }

    def authorize(self, header: str | None) -> None:
        if self.token is None:
            return
        if not hmac.compare_digest((header or "").encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "missing or wrong bearer token (header Authorization)")

    # --- endpoints ------------------------------------------------------------------------

    async def score(self, body: dict) -> dict[str, Any]:
        items = self._list(body, "items", "{prompt, reference?, response} objects")
        with self.batcher.announced():
            sequences = await self._template(self._item_sequences, items, "items")
        values = await self.batcher.submit([Row.single(s) for s in sequences], self._timeout)
        return {"rewards": [float(v[-1]) for v in values]}

    async def score_groups(self, body: dict) -> dict[str, Any]:
        groups = self._list(body, "groups", "{prompt, reference?, responses} objects")
        for g, group in enumerate(groups):
            responses = group.get("responses") if isinstance(group, dict) else None
            if not isinstance(responses, list) or not responses:
                raise RequestError(400, f"groups[{g}]: field 'responses' must be a non-empty list")
        self._at_most(sum(len(group["responses"]) for group in groups), "responses")
        with self.batcher.announced():
            per_group = await self._template(self._group_sequences, groups, "groups")
        packed = Groups.pack(per_group, self.scorer.grid.max_length)
        rewards = packed.rewards(await self.batcher.submit(packed.rows, self._timeout))
        return {
            "rewards": [r.tolist() for r in rewards],
            "normalized": [protocols.group_normalized(r) for r in rewards],
        }

    async def get_reward(self, body: dict) -> dict[str, Any]:
        texts = protocols.texts_of(body, "query")
        return protocols.get_reward(await self._score_inputs(texts, "query"))

    async def pooling_endpoint(self, body: dict) -> dict[str, Any]:
        protocols.refuse_chat(body)
        inputs = protocols.inputs_of(body.get("input"), "input")
        if self.pooling == "lmdeploy":
            return protocols.lmdeploy_pooling(await self._score_inputs(inputs, "input"), self.name)
        activation, task = protocols.activation_requested(body), protocols.pooling_task(body)
        scored = await self._score_inputs(inputs, "input")
        return protocols.vllm_pooling(scored, self.name, activation, task)

    async def classify(self, body: dict) -> Any:
        if "text" in body or "input_ids" in body:  # SGLang's native form
            field = "text" if "text" in body else "input_ids"
            value = body[field]
            if (
                field == "text"
                and isinstance(value, list)
                and any(isinstance(v, list) for v in value)
            ):
                raise RequestError(400, "field 'text' must be a text or a list of texts")
            inputs = protocols.inputs_of(value, field)
            scored = await self._score_inputs(inputs, field)
            single = isinstance(value, str) or (
                field == "input_ids" and protocols.is_token_ids(value)
            )
            return protocols.sglang_classify(scored, single, body.get("rid"))
        protocols.refuse_chat(body)
        inputs = protocols.inputs_of(body.get("input"), "input")
        activation = protocols.activation_requested(body)
        scored = await self._score_inputs(inputs, "input")
        return protocols.vllm_classify(scored, self.name, activation)

    async def embeddings(self, body: dict) -> dict[str, Any]:
        inputs = protocols.inputs_of(body.get("input"), "input")
        return protocols.embeddings(await self._score_inputs(inputs, "input"), self.name)

    async def tokenize(self, body: dict) -> dict[str, Any]:
        protocols.refuse_chat(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(400, "field 'prompt' must be a text")
        special = body.get("add_special_tokens", True)
        tokenizer = self.scorer.template.tokenizer
        tokens = await self._template(
            lambda texts: [tokenizer.encode(t, add_special_tokens=bool(special)) for t in texts],
            [prompt],
            "prompt",
        )
        strings = (
            [tokenizer.id_to_token(t) for t in tokens[0]] if body.get("return_token_strs") else None
        )
        return {
            "count": len(tokens[0]),
            "max_model_len": self.scorer.max_length,
            "tokens": tokens[0],
            "token_strs": strings,
        }

    async def models(self, body: dict) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "jaxrm",
                    "root": self.name,
                    "parent": None,
                    "max_model_len": self.scorer.max_length,
                }
            ],
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.name,
            "objective": self.scorer.objective,
            "max_length": self.scorer.max_length,
            **self.batcher.counts,
            "truncated": self.truncated,
            "reward_token_added": self.reward_token_added,
            "waiting": self.batcher.jobs.qsize(),
            "compiled_shapes": self.scorer.counts.compiles,
            "xla_compiles": self.metrics.compiles,
        }

    def metrics_text(self) -> str:
        return self.metrics.render(
            self.batcher, self.scorer, self.truncated, self.reward_token_added
        )

    # --- shared steps ---------------------------------------------------------------------

    @property
    def _timeout(self) -> float:
        return self.limits.request_timeout

    def _list(self, body: dict, field: str, what: str) -> list:
        values = body.get(field)
        if not isinstance(values, list):
            raise RequestError(400, f"field '{field}' must be a list of {what}")
        self._at_most(len(values), field)
        return values

    def _at_most(self, count: int, what: str) -> None:
        if count > self.limits.max_items:
            raise RequestError(413, f"{count} {what}; at most {self.limits.max_items} per request")

    async def _template(self, work: Callable[[list], list], values: list, field: str) -> list:
        self._at_most(len(values), field)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._templater, work, values)
        except UserError as e:
            raise RequestError(400, str(e)) from None

    def _item_sequences(self, items: list) -> list[np.ndarray]:
        scorer = self.scorer
        return [
            scorer.score_sequence(scorer.check_score_row(item, f"items[{i}]"))
            for i, item in enumerate(items)
        ]

    def _group_sequences(self, groups: list) -> list[list[np.ndarray]]:
        scorer, out = self.scorer, []
        for g, group in enumerate(groups):
            base = {k: v for k, v in group.items() if k != "responses"}
            out.append(
                [
                    scorer.score_sequence(
                        scorer.check_score_row(
                            {**base, "response": r}, f"groups[{g}].responses[{k}]"
                        )
                    )
                    for k, r in enumerate(group["responses"])
                ]
            )
        return out

    def _encode_inputs(self, inputs: list) -> list[tuple[np.ndarray, bool, bool]]:
        return [
            self.scorer.text_sequence(x) if isinstance(x, str) else self.scorer.ids_sequence(x)
            for x in inputs
        ]

    async def _score_inputs(self, inputs: list, field: str) -> list[Scored]:
        with self.batcher.announced():
            encoded = await self._template(self._encode_inputs, inputs, field)
        values = await self.batcher.submit([Row.single(s) for s, _, _ in encoded], self._timeout)
        scored = [Scored(v, added, cut) for v, (_, added, cut) in zip(values, encoded, strict=True)]
        self.truncated += sum(s.truncated for s in scored)
        self.reward_token_added += sum(s.reward_token_added for s in scored)
        return scored


class App:
    """The ASGI application: routing, bodies within limits, JSON in and out."""

    def __init__(self, service: RewardService):
        self.service = service
        self.routes = service.routes()

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
            return e.status, {"error": e.message}, json_type
        except Exception as e:
            traceback.print_exc()
            return 500, {"error": f"internal error: {type(e).__name__}: {e}"}, json_type

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


def cmd_serve(args: argparse.Namespace) -> None:
    positive = (args.max_batch, args.max_items, args.max_body_mb, args.request_timeout)
    if min(positive) <= 0 or args.max_queue <= 0 or args.backlog <= 0:
        raise UserError(
            "--max-batch, --max-items, --max-body-mb, --request-timeout, --max-queue and "
            "--backlog must be > 0"
        )
    if args.max_wait_ms < 0:
        raise UserError("--max-wait-ms must be >= 0")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.host not in LOOPBACK and token is None and not args.allow_unauthenticated:
        raise UserError(
            f"listening on {args.host} without a token lets anyone who can reach it use the "
            f"model; set --token or {TOKEN_ENV}, or pass --allow-unauthenticated"
        )
    sock = listen(args.host, args.port, args.backlog)
    use_compile_cache(args.compile_cache)
    scorer = open_scorer(args)
    started = time.perf_counter()
    with tqdm(total=len(scorer.grid.shapes()), desc="compiling batch shapes", unit="shape") as bar:
        scorer.compile_grid(lambda done, total: bar.update(1))
    seconds = time.perf_counter() - started
    print(f"jaxrm serve: {bar.total} batch shapes ready in {seconds:.1f} s", file=sys.stderr)
    batcher = Batcher(scorer, args.max_batch, args.max_wait_ms / 1000, args.max_queue)
    limits = Limits(args.max_items, int(args.max_body_mb * 2**20), args.request_timeout)
    name = args.served_model_name or Path(args.checkpoint).absolute().name
    service = RewardService(scorer, batcher, limits, token, name, args.pooling)
    config = uvicorn.Config(
        App(service),
        backlog=args.backlog,
        timeout_keep_alive=60,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    print(f"jaxrm serve: {scorer.objective} reward model on http://{host}:{port}", flush=True)
    # uvicorn stops gracefully on SIGTERM / SIGINT and then raises the signal again for the
    # handler it found: make that one a no-op, so a requested stop exits 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        batcher.stop()
    print("jaxrm serve: stopped", flush=True)


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    serve = commands.add_parser(
        "serve",
        help="HTTP reward server (vLLM, SGLang, lmdeploy and OpenRLHF APIs, /score, /health)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_scorer_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--max-batch", type=int, default=256, help="sequences scored together")
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=20.0,
        help="how long a batch waits for requests already on their way (none: it starts at once)",
    )
    serve.add_argument("--max-items", type=int, default=1024, help="inputs per request, at most")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="request body, at most")
    serve.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds a request waits for rewards"
    )
    serve.add_argument(
        "--max-queue", type=int, default=4096, help="requests waiting for the model, at most"
    )
    serve.add_argument(
        "--backlog", type=int, default=2048, help="connections waiting to be accepted, at most"
    )
    serve.add_argument(
        "--token", help=f"require 'Authorization: Bearer TOKEN' (or set {TOKEN_ENV})"
    )
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on an address other than loopback without a token",
    )
    serve.add_argument(
        "--served-model-name", help="the model name replies carry (default: the directory's name)"
    )
    serve.add_argument(
        "--pooling",
        choices=["vllm", "lmdeploy"],
        default="vllm",
        help="reply shape of /pooling: vLLM's (a [reward] per token) or lmdeploy's (one float)",
    )
    add_compile_cache_option(serve)
    serve.set_defaults(run=cmd_serve)
