"""`jaxrm serve CHECKPOINT`: the reward model behind HTTP, for RL frameworks and their engines.

    POST /score         {"items": [{"prompt", "reference"?, "response"}, ...]} -> {"rewards"}
                        (a multi-attribute head: also "scores", [{attribute: output}, ...])
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
import queue
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxrm.errors import UserError
from jaxrm.http_server import (
    App,
    Limits,
    Metrics,
    RequestError,
    add_listen_options,
    check_bearer,
    open_listener,
    serve_forever,
    settle,
)
from jaxrm.scoring import protocols
from jaxrm.scoring.protocols import Scored
from jaxrm.scoring.scorer import (
    Groups,
    Row,
    Scorer,
    add_scorer_options,
    open_scorer,
    process_rewards,
)
from jaxrm.storage import add_compile_cache_option, use_compile_cache


@dataclasses.dataclass
class Job:
    rows: list[Row]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        settle(self.loop, self.future, result, error)


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
        check_bearer(self.token, header)

    # --- endpoints ------------------------------------------------------------------------

    async def score(self, body: dict) -> dict[str, Any]:
        if self.scorer.objective == "prm":
            return await self.score_processes(self._list(body, "items", "{prompt, steps} objects"))
        items = self._list(body, "items", "{prompt, reference?, response} objects")
        with self.batcher.announced():
            sequences = await self._template(self._item_sequences, items, "items")
        values = await self.batcher.submit([Row.single(s) for s in sequences], self._timeout)
        last = [v[-1] for v in values]
        answer: dict[str, Any] = {"rewards": [float(self.scorer.reward_of(v)) for v in last]}
        if self.scorer.attributes:
            answer["scores"] = [self.scorer.named(v) for v in last]
        return answer

    async def score_processes(self, items: list) -> dict[str, Any]:
        """A process reward model's /score: each solution's step rewards, the lowest as its
        reward and the last."""
        with self.batcher.announced():
            solutions = await self._template(self._process_sequences, items, "items")
        rows = [Row.single(tokens) for tokens, _ in solutions]
        values = await self.batcher.submit(rows, self._timeout)
        scored = [
            process_rewards(v[reads]) for v, (_, reads) in zip(values, solutions, strict=True)
        ]
        return {
            "rewards": [s["reward"] for s in scored],
            "step_rewards": [s["step_rewards"] for s in scored],
            "rewards_last": [s["reward_last"] for s in scored],
        }

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
        outputs = packed.rewards(await self.batcher.submit(packed.rows, self._timeout))
        rewards = [self.scorer.reward_of(r) for r in outputs]
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
        labels = self.scorer.attributes or ["LABEL_0"]
        return protocols.vllm_classify(scored, self.name, activation, labels)

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
            "attributes": self.scorer.attributes,
            "max_length": self.scorer.max_length,
            **self.batcher.counts,
            "truncated": self.truncated,
            "reward_token_added": self.reward_token_added,
            "waiting": self.batcher.jobs.qsize(),
            "compiled_shapes": self.scorer.counts.compiles,
            "xla_compiles": self.metrics.compiles,
        }

    def metrics_text(self) -> str:
        batcher, scorer = self.batcher, self.scorer
        counters = {
            "jaxrm_sequences_total": ("sequences scored", batcher.counts["sequences"]),
            "jaxrm_batches_total": ("batches run on the model", batcher.counts["batches"]),
            "jaxrm_tokens_total": ("tokens scored, padding excluded", scorer.counts.tokens),
            "jaxrm_padded_tokens_total": ("tokens computed", scorer.counts.padded_tokens),
            "jaxrm_truncated_total": ("inputs longer than data.max_length", self.truncated),
            "jaxrm_reward_token_added_total": (
                "inputs the reward token was appended to",
                self.reward_token_added,
            ),
        }
        waiting = ("Requests queued for the batcher", batcher.jobs.qsize())
        return self.metrics.render(counters, {"jaxrm_waiting_requests": waiting})

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

    def _process_sequences(self, items: list) -> list[tuple[np.ndarray, np.ndarray]]:
        scorer = self.scorer
        return [
            scorer.process_sequence(scorer.check_process_row(item, f"items[{i}]"))
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
        scorer = self.scorer
        scored = [
            Scored(scorer.reward_of(v), added, cut, v if scorer.attributes else None)
            for v, (_, added, cut) in zip(values, encoded, strict=True)
        ]
        self.truncated += sum(s.truncated for s in scored)
        self.reward_token_added += sum(s.reward_token_added for s in scored)
        return scored


def cmd_serve(args: argparse.Namespace) -> None:
    positive = (args.max_batch, args.max_items, args.request_timeout, args.max_queue)
    if min(positive) <= 0:
        raise UserError("--max-batch, --max-items, --request-timeout and --max-queue must be > 0")
    if args.max_wait_ms < 0:
        raise UserError("--max-wait-ms must be >= 0")
    sock, token = open_listener(args)
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
    host, port = sock.getsockname()[:2]
    print(f"jaxrm serve: {scorer.objective} reward model on http://{host}:{port}", flush=True)
    try:
        serve_forever(App(service), sock, args.backlog)
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
    add_listen_options(serve)
    serve.add_argument("--max-batch", type=int, default=256, help="sequences scored together")
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=20.0,
        help="how long a batch waits for requests already on their way (none: it starts at once)",
    )
    serve.add_argument("--max-items", type=int, default=1024, help="inputs per request, at most")
    serve.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds a request waits for rewards"
    )
    serve.add_argument(
        "--max-queue", type=int, default=4096, help="requests waiting for the model, at most"
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
