"""`jaxrm serve-lm MODEL`: jaxrm's sampler behind the OpenAI-compatible completions API.

    POST /v1/completions  {"model", "prompt", "n"?, "max_tokens"?, "temperature"?, "top_p"?,
                           "top_k"?, "seed"?, "stop"?, "stop_token_ids"?, "ignore_eos"?,
                           "return_token_ids"?, "add_special_tokens"?}
                          -> {"id", "object": "text_completion", "created", "model",
                              "choices": [{"index", "text", "finish_reason", "stop_reason",
                                           "logprobs": null, "token_ids"?, "prompt_token_ids"?}],
                              "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    GET  /v1/models, /health, /metrics (Prometheus text)

A TPU slice or a CPU box becomes a policy endpoint that `jaxrm generate` and the pools (or any
OpenAI client) can use. MODEL is what `jaxrm generate` takes: a Hugging Face causal LM
directory or a jaxrm checkpoint with an LM head. Requests share the sampler's rows (continuous
batching, --max-num-seqs rows, a KV cache of --max-model-len positions): a new request starts
at the next decode chunk, not when the batch ends.

Fields follow OpenAI's and vLLM's names and defaults (max_tokens 16, null: the rest of the
context; temperature 1; top_k -1 or 0: off). A text prompt is encoded with BOS
(add_special_tokens), as `jaxrm generate` does, so greedy answers equal local generation token for
token. `seed` s gives choice i of a prompt the seed s + i (vLLM's convention); `jaxrm generate`
sends each sample's own seed with n = 1, and in float32 a seeded sample equals the one local
generation draws, whatever else the server runs beside it. `stop` strings end an answer where
they first appear (the text stops before them; `stop_reason` names them); `stop_token_ids` end
it at those ids besides the model's EOS (`ignore_eos` drops the EOS). Fields this server cannot
honour (stream, echo, logprobs, suffix, best_of > n, penalties, min_p, min_tokens, logit_bias)
are refused with 400 when set to anything but their default, never ignored. Errors are
OpenAI's {"error": {"message", "type", "code"}}; a wrong `model` is 404 (vLLM's).
"""

import argparse
import asyncio
import contextlib
import dataclasses
import queue
import secrets
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from jaxrm import storage
from jaxrm.errors import UserError
from jaxrm.generate.sampler import Generated, Request, Sampler, Sampling
from jaxrm.generate.trajectories import Model, add_model_arguments, open_model, response_text
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

SEED_RANGE = 2**31
# Fields of OpenAI's and vLLM's completions requests this server does not implement, with the
# values that mean "not used": anything else is refused rather than silently ignored.
UNUSED = {
    "stream": (False, None),
    "echo": (False, None),
    "logprobs": (None, 0, False),
    "suffix": (None, ""),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "repetition_penalty": (1, 1.0, None),
    "min_p": (0, 0.0, None),
    "min_tokens": (0, None),
    "logit_bias": (None, {}),
    "prompt_logprobs": (None,),
    "include_stop_str_in_output": (False, None),
    "skip_special_tokens": (True, None),
    "use_beam_search": (False, None),
    "response_format": (None,),
}


@dataclasses.dataclass(eq=False)  # one per HTTP request: compared, hashed by identity
class Completion:
    """One request's samples on their way: filled in by the engine thread."""

    prompts: list[list[int]]
    n: int
    stops: list[str]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    results: dict[int, Generated] = dataclasses.field(default_factory=dict)
    cancelled: bool = False

    @property
    def count(self) -> int:
        return len(self.prompts) * self.n

    def settle(self, error: BaseException | None = None) -> None:
        settle(self.loop, self.future, self.results, error)


class Engine:
    """Runs the sampler on one thread over the requests of every HTTP request (its `Feed`)."""

    def __init__(self, model: Model, sampler: Sampler, cache_length: int, max_queue: int):
        self.model, self.sampler, self.cache_length = model, sampler, cache_length
        self.waiting: queue.Queue[tuple[Any, Request]] = queue.Queue()
        self.max_queue = max_queue
        self.counts = {"requests": 0, "samples": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.running = 0
        self.active: set[Completion] = set()  # with samples in the sampler's rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jaxrm-serve-lm", daemon=True)
        self._thread.start()

    def submit(self, completion: Completion, requests: list[Request]) -> None:
        if self.waiting.qsize() + len(requests) > self.max_queue:
            raise RequestError(503, "the server is busy; retry later")
        for number, request in enumerate(requests):
            self.waiting.put(((completion, number), request))
        self.counts["requests"] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    # --- the sampler's Feed -----------------------------------------------------------

    def take(self, free: int, wait: bool) -> list[tuple[Any, Request]] | None:
        if self._stop.is_set():
            return None
        taken = []
        with contextlib.suppress(queue.Empty):  # the queue ran dry: start with what there is
            if wait:
                taken.append(self.waiting.get(timeout=0.1))
            while len(taken) < free:
                taken.append(self.waiting.get_nowait())
        taken = [item for item in taken if not item[0][0].cancelled]
        self.running += len(taken)
        self.active = {c for c in self.active if not c.cancelled}
        self.active.update(completion for (completion, _), _ in taken)
        return taken

    def cut(self, key: Any, tokens: list[int]) -> int | None:
        completion, number = key
        if completion.cancelled:
            return len(tokens)
        if not completion.stops:
            return None
        prompt = completion.prompts[number // completion.n]
        return _stop_cut(self.model, prompt, tokens, completion.stops)

    # ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for finished in self.sampler.run(self, self.cache_length, self.cache_length):
                    self._deliver(finished)
            except Exception as e:  # a bug, not the client's: fail what is on hand, keep serving
                traceback.print_exc()
                self._fail_all(RequestError(500, f"generation failed: {type(e).__name__}: {e}"))

    def _deliver(self, finished: list[tuple[Any, Generated]]) -> None:
        self.running -= len(finished)
        for (completion, number), generated in finished:
            completion.results[number] = generated
            if len(completion.results) == completion.count:
                self.active.discard(completion)
                completion.settle()

    def _fail_all(self, error: RequestError) -> None:
        self.running = 0
        for completion in self.active:
            completion.settle(error)
        self.active.clear()
        while True:
            try:
                (completion, _), _ = self.waiting.get_nowait()
            except queue.Empty:
                return
            completion.settle(error)


def _stop_cut(model: Model, prompt: list[int], tokens: list[int], stops: list[str]) -> int | None:
    """How many of `tokens` it takes for the answer's text to hold one of `stops`, or None."""
    eos = set(model.eos_ids)
    text = response_text(model.tokenizer, prompt, tokens, eos)
    if not any(s in text for s in stops):
        return None
    for keep in range(1, len(tokens) + 1):
        if any(s in response_text(model.tokenizer, prompt, tokens[:keep], eos) for s in stops):
            return keep
    return len(tokens)


class CompletionService:
    """What the endpoints do, apart from HTTP."""

    def __init__(self, engine: Engine, limits: Limits, token: str | None, name: str):
        self.engine, self.limits, self.token, self.name = engine, limits, token, name
        self.model = engine.model
        self.metrics = Metrics()

    def routes(self) -> dict[str, tuple[str, Callable[[dict], Awaitable[Any]] | None]]:
        return {
            "/health": ("GET", None),
            "/metrics": ("GET", None),
            "/v1/models": ("GET", self.models),
            "/v1/completions": ("POST", self.completions),
        }

    def authorize(self, header: str | None) -> None:
        check_bearer(self.token, header)

    async def models(self, body: dict) -> dict[str, Any]:
        card = {
            "id": self.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "jaxrm",
            "root": self.name,
            "parent": None,
            "max_model_len": self.engine.cache_length,
        }
        return {"object": "list", "data": [card]}

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.name,
            "max_model_len": self.engine.cache_length,
            "max_num_seqs": self.engine.sampler.batch_size,
            "running": self.engine.running,
            "waiting": self.engine.waiting.qsize(),
            **self.engine.counts,
            "xla_compiles": self.metrics.compiles,
        }

    def metrics_text(self) -> str:
        counts = self.engine.counts
        counters = {
            "jaxrm_completion_requests_total": ("completion requests", counts["requests"]),
            "jaxrm_samples_total": ("samples generated", counts["samples"]),
            "jaxrm_prompt_tokens_total": ("prompt tokens", counts["prompt_tokens"]),
            "jaxrm_generation_tokens_total": ("tokens generated", counts["completion_tokens"]),
        }
        gauges = {
            "jaxrm_running_samples": ("Samples in the sampler's rows", self.engine.running),
            "jaxrm_waiting_samples": ("Samples waiting for a row", self.engine.waiting.qsize()),
        }
        return self.metrics.render(counters, gauges)

    async def completions(self, body: dict) -> dict[str, Any]:
        asked = parse_completion(body, self.name, self.model, self.engine.cache_length)
        if asked.n * len(asked.prompts) > self.limits.max_items:
            raise RequestError(
                413,
                f"{asked.n * len(asked.prompts)} samples; at most {self.limits.max_items} "
                "per request",
            )
        loop = asyncio.get_running_loop()
        completion = Completion(asked.prompts, asked.n, asked.stops, loop.create_future(), loop)
        self.engine.submit(completion, asked.requests())
        try:
            results = await asyncio.wait_for(
                asyncio.shield(completion.future), self.limits.request_timeout
            )
        except TimeoutError:
            completion.cancelled = True
            raise RequestError(
                503, f"no completion within {self.limits.request_timeout:g} s; retry later"
            ) from None
        except asyncio.CancelledError:  # the client went away: free its rows
            completion.cancelled = True
            raise
        return self._reply(asked, results)

    def _reply(self, asked: "Asked", results: dict[int, Generated]) -> dict[str, Any]:
        eos = set(self.model.eos_ids)
        choices, generated = [], 0
        for number in range(asked.n * len(asked.prompts)):
            prompt = asked.prompts[number // asked.n]
            tokens, finish, reason = results[number].tokens, results[number].finish, None
            text = response_text(self.model.tokenizer, prompt, tokens, eos)
            found = [(text.find(s), s) for s in asked.stops if s in text]
            if found:  # the text stops before the stop text, the ids with the one that made it
                at, reason = min(found)
                tokens = tokens[: _stop_cut(self.model, prompt, tokens, asked.stops)]
                text, finish = text[:at], "stop"
            elif finish == "stop" and tokens:
                reason = tokens[-1]
            choice = {
                "index": number,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None if reason in eos else reason,
            }
            if asked.return_token_ids:
                choice |= {"prompt_token_ids": prompt, "token_ids": tokens}
            choices.append(choice)
            generated += len(tokens)
        prompt_tokens = sum(map(len, asked.prompts)) * asked.n
        counts = self.engine.counts
        counts["samples"] += len(choices)
        counts["prompt_tokens"] += prompt_tokens
        counts["completion_tokens"] += generated
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated,
            },
        }


@dataclasses.dataclass
class Asked:
    """A completions request, checked."""

    prompts: list[list[int]]
    n: int
    max_tokens: list[int]  # per prompt
    sampling: Sampling
    seed: int | None
    stops: list[str]
    stop_ids: tuple[int, ...]
    return_token_ids: bool

    def requests(self) -> list[Request]:
        out = []
        for p, prompt in enumerate(self.prompts):
            for i in range(self.n):
                seed = secrets.randbelow(SEED_RANGE) if self.seed is None else self.seed + i
                out.append(
                    Request(
                        prompt,
                        self.max_tokens[p],
                        seed % SEED_RANGE,
                        self.sampling,
                        self.stop_ids,
                        watch=True,
                    )
                )
        return out


def parse_completion(body: dict, name: str, model: Model, max_model_len: int) -> Asked:
    """The request's prompts as token ids and its settings, or a 400 / 404 saying what is wrong."""
    if body.get("model") not in (None, name):
        raise RequestError(404, f"The model `{body['model']}` does not exist; this is `{name}`")
    for field, defaults in UNUSED.items():
        if field in body and not any(_same(body[field], d) for d in defaults):
            raise RequestError(400, f"field '{field}' is not supported by jaxrm serve-lm")
    n = _integer(body, "n", 1, low=1)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise RequestError(400, "field 'best_of' is not supported (only best_of = n)")
    add_bos = _flag(body, "add_special_tokens", True)
    prompts = [_prompt_ids(p, model, add_bos) for p in _prompts(body.get("prompt"))]
    vocab = model.tokenizer.vocab_size
    for i, ids in enumerate(prompts):
        if not ids:
            raise RequestError(400, f"prompt {i} is empty")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(400, f"prompt {i}: token id {bad} is outside the vocabulary")
    max_tokens = body.get("max_tokens", 16)
    budgets = []
    for i, ids in enumerate(prompts):
        room = max_model_len - len(ids)
        wanted = room if max_tokens is None else _integer(body, "max_tokens", 16, low=1)
        if room < 1 or wanted > room:
            raise RequestError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {len(ids) + wanted} tokens ({len(ids)} in prompt {i}, {wanted} in "
                "the completion). Please reduce the prompt or max_tokens.",
            )
        budgets.append(wanted)
    top_k = _integer(body, "top_k", 0, low=-1)
    try:
        sampling = Sampling(
            _number(body, "temperature", 1.0), max(top_k, 0), _number(body, "top_p", 1.0)
        )
    except UserError as e:
        raise RequestError(400, str(e)) from None
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "field 'seed' must be a whole number or null")
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "field 'stop' must be a text or a list of non-empty texts")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_ids
    ):
        raise RequestError(400, "field 'stop_token_ids' must be a list of token ids")
    eos = () if _flag(body, "ignore_eos", False) else tuple(model.eos_ids)
    every_stop = tuple(sorted({*eos, *stop_ids}))
    if len(every_stop) > Sampler.STOP_SLOTS:
        raise RequestError(400, f"at most {Sampler.STOP_SLOTS} stop token ids")
    return Asked(
        prompts,
        n,
        budgets,
        sampling,
        seed,
        stops,
        every_stop,
        _flag(body, "return_token_ids", False),
    )


def _same(value: Any, default: Any) -> bool:
    return (type(value) is type(default) and value == default) or value is default


def _prompts(value: Any) -> list[Any]:
    """vLLM's prompt forms: a text, texts, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(_is_int(v) for v in value):
            return [value]
        if all(isinstance(v, str) or (isinstance(v, list) and all(map(_is_int, v))) for v in value):
            return value
    raise RequestError(
        400, "field 'prompt' must be a text, a list of texts, token ids or lists of token ids"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_ids(prompt: str | list[int], model: Model, add_bos: bool) -> list[int]:
    if isinstance(prompt, list):
        return list(prompt)
    return model.tokenizer.encode(prompt, add_special_tokens=add_bos)


def _integer(body: dict, field: str, default: int, low: int) -> int:
    value = body.get(field, default)
    if value is None:
        return default
    if not _is_int(value) or value < low:
        raise RequestError(400, f"field '{field}' must be a whole number >= {low}")
    return value


def _number(body: dict, field: str, default: float) -> float:
    value = body.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(400, f"field '{field}' must be a number")
    return float(value)


def _flag(body: dict, field: str, default: bool) -> bool:
    value = body.get(field, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"field '{field}' must be true or false")
    return value


def cmd_serve_lm(args: argparse.Namespace) -> None:
    if min(args.max_num_seqs, args.max_items, args.max_queue) <= 0 or args.request_timeout <= 0:
        raise UserError(
            "--max-num-seqs, --max-items, --max-queue and --request-timeout must be > 0"
        )
    sock, token = open_listener(args)
    storage.use_compile_cache(args.compile_cache)
    model = open_model(args.model, args.overrides, args.tokenizer, args.eos)
    length = args.max_model_len or min(model.max_positions, 4096)
    if not 2 <= length <= model.max_positions:
        raise UserError(
            f"--max-model-len must be in [2, {model.max_positions}] (the model's context), "
            f"got {length}"
        )
    sampler = model.sampler(Sampling(), 0, args.max_num_seqs)
    engine = Engine(model, sampler, length, args.max_queue)
    limits = Limits(args.max_items, int(args.max_body_mb * 2**20), args.request_timeout)
    name = args.served_model_name or storage.name(storage.absolute(args.model))
    service = CompletionService(engine, limits, token, name)
    host, port = sock.getsockname()[:2]
    print(
        f"jaxrm serve-lm: {name} on http://{host}:{port}/v1 ({sampler.batch_size} rows of "
        f"{length} positions)",
        flush=True,
    )
    try:
        serve_forever(App(service, openai_errors=True), sock, args.backlog)
    finally:
        engine.stop()
    print("jaxrm serve-lm: stopped", file=sys.stderr, flush=True)


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    serve = commands.add_parser(
        "serve-lm",
        help="a causal LM behind the OpenAI-compatible /v1/completions API (a policy endpoint)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(serve)
    add_listen_options(serve)
    serve.add_argument(
        "--max-num-seqs", type=int, default=32, help="sequences decoded together (default 32)"
    )
    serve.add_argument(
        "--max-model-len",
        type=int,
        help="positions per sequence, prompt and answer (default: the model's, at most 4096)",
    )
    serve.add_argument(
        "--max-items", type=int, default=1024, help="samples (prompts x n) per request, at most"
    )
    serve.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds a request waits, at most"
    )
    serve.add_argument(
        "--max-queue", type=int, default=65536, help="samples waiting for a row, at most"
    )
    serve.add_argument(
        "--served-model-name", help="the model's name in requests and replies (default: MODEL's)"
    )
    storage.add_compile_cache_option(serve)
    serve.set_defaults(run=cmd_serve_lm)
