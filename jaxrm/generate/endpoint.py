"""Policies served by an inference engine behind OpenAI's `/v1/completions` API.

    endpoint: {url: http://10.0.0.2:8000/v1, model: Qwen/Qwen2-7B, engine: vllm,
               api_key_env: VLLM_API_KEY, concurrency: 16, timeout: 600, retries: 6,
               stop_ids: [151643]}

Every sample is one request with n = 1 and the sample's own seed (`sample_seed` of the run
seed, prompt index and sample index), so a sample never depends on which others share its
request or batch, lmdeploy (which ignores n) is served like the rest, and a rerun asks for
exactly the samples still missing. Every sampling setting is sent explicitly (temperature,
top_p, top_k, max_tokens, penalties off, min_p 0), because engines fill missing fields from the
model's generation_config.json. The prompt is sent as text (flattened as `jaxrm generate` does);
the engine encodes it with its own tokenizer and BOS.

What each engine promises is recorded with the output (`GUARANTEES`): whether the per-request
seed is honoured and reproducible, how the response length is known (the token ids where the
engine returns them, else the reply's usage, exact with n = 1), and whether extra stop ids can
be sent. Failures (connection errors, timeouts, 429 and 5xx, replies without a usable choice)
are retried with jittered back-off up to `retries` times; another 4xx, or retries running out,
stops the run with one line naming the policy. At most `concurrency` requests are in flight,
and at most `WINDOW` times that many samples are done ahead of the first one still missing, so
a kill loses at most that much work.
"""

import concurrent.futures
import dataclasses
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from jaxrm.data.templates import flatten
from jaxrm.errors import UserError
from jaxrm.generate.sampler import Sampling, sample_seed
from jaxrm.scoring.client import ServerError, request_json

WINDOW = 8
# engine -> what it does with the request fields jaxrm relies on.
ENGINES: dict[str, dict[str, Any]] = {
    "vllm": {"top_k_off": -1, "token_ids": "token_ids", "stop_ids": True},
    "vllm-tpu": {"top_k_off": -1, "token_ids": "token_ids", "stop_ids": True},
    "sglang": {"top_k_off": -1, "token_ids": None, "stop_ids": True},
    "lmdeploy": {"top_k_off": 0, "token_ids": "gen_tokens", "stop_ids": False},
    "jaxrm": {"top_k_off": 0, "token_ids": "token_ids", "stop_ids": True},
}
GUARANTEES = {
    "vllm": "seeded per request; bitwise reproducible only in vLLM's batch-invariant mode "
    "(VLLM_BATCH_INVARIANT=1)",
    "vllm-tpu": "not seeded: vLLM on TPU ignores per-request seeds",
    "sglang": "seeded per request (sampling_seed); reproducible only with "
    "--enable-deterministic-inference",
    "lmdeploy": "seeded per request",
    "jaxrm": "seeded per request; in float32 bitwise equal to local generation whatever the batch",
}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a policy is served and how to talk to it."""

    url: str  # the API's base, e.g. http://host:8000/v1
    model: str | None = None  # None: the one model the server lists
    engine: str = "vllm"
    api_key_env: str | None = None
    concurrency: int = 8
    timeout: float = 600.0
    retries: int = 6
    stop_ids: tuple[int, ...] = ()

    KEYS = (
        "url",
        "model",
        "engine",
        "api_key_env",
        "concurrency",
        "timeout",
        "retries",
        "stop_ids",
    )

    @classmethod
    def parse(cls, given: Any, where: str) -> "Endpoint":
        """An `endpoint:` mapping of a pool file, checked key by key."""
        if not isinstance(given, dict):
            raise UserError(f"{where}: must be a mapping with at least 'url'")
        unknown = sorted(set(given) - set(cls.KEYS))
        if unknown:
            raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(cls.KEYS)})")
        kinds = {
            "url": str,
            "model": str,
            "engine": str,
            "api_key_env": str,
            "concurrency": int,
            "timeout": (int, float),
            "retries": int,
            "stop_ids": list,
        }
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, kinds[key]):
                raise UserError(f"{where}.{key}: wrong type, got {value!r}")
        if "url" not in given:
            raise UserError(f"{where}.url: is missing")
        stop_ids = given.get("stop_ids", [])
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop_ids):
            raise UserError(f"{where}.stop_ids: must be a list of token ids")
        return cls(**{**given, "stop_ids": tuple(stop_ids)}).checked(where)

    def checked(self, where: str | None) -> "Endpoint":
        """Itself, or a one-line error naming the key (`where`.key of a file, or --key)."""

        def key(name: str) -> str:
            flags = {"url": "MODEL", "model": "--endpoint-model", "stop_ids": "--eos"}
            return f"{where}.{name}" if where else flags.get(name, f"--{name.replace('_', '-')}")

        parts = urllib.parse.urlparse(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"{key('url')}: {self.url!r} is not an http(s) URL")
        if self.engine not in ENGINES:
            raise UserError(f"{key('engine')}: {self.engine!r} (known: {', '.join(ENGINES)})")
        if self.concurrency < 1:
            raise UserError(f"{key('concurrency')}: must be >= 1, got {self.concurrency}")
        if self.retries < 0:
            raise UserError(f"{key('retries')}: must be >= 0, got {self.retries}")
        if not self.timeout > 0:
            raise UserError(f"{key('timeout')}: must be > 0, got {self.timeout}")
        if self.stop_ids and not ENGINES[self.engine]["stop_ids"]:
            raise UserError(
                f"{key('stop_ids')}: {self.engine}'s completions API takes no stop token ids"
            )
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise UserError(f"{key('api_key_env')}: ${self.api_key_env} is not set")
        return self

    @property
    def base(self) -> str:
        return self.url.rstrip("/")

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        return headers

    def served_model(self, name: str) -> str:
        """`model`, or the only model the server lists at /models."""
        if self.model is not None:
            return self.model
        try:
            listed = request_json(
                "GET", self.base + "/models", None, self.headers(), timeout=30, retries=self.retries
            )
        except ServerError as e:
            raise UserError(f"policy {name}: {e}") from None
        models = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict)]
        if len(models) != 1 or not isinstance(models[0], str):
            raise UserError(
                f"policy {name}: {self.base}/models lists {models}; name the model to use"
            )
        return models[0]

    def settings(self, model: str) -> dict[str, Any]:
        """What a rerun must send the same way for its output to be resumed (not the URL: a
        server may move)."""
        return {
            "endpoint_model": model,
            "engine": self.engine,
            "stop_ids": list(self.stop_ids),
            "guarantees": guarantees(self.engine),
        }


def guarantees(engine: str) -> dict[str, str]:
    """What an engine promises about seeds and response lengths (recorded with the output)."""
    lengths = ENGINES[engine]["token_ids"]
    return {
        "seeds": GUARANTEES[engine],
        "lengths": "token ids" if lengths else "usage.completion_tokens (n = 1: exact)",
    }


@dataclasses.dataclass
class Answer:
    text: str
    finish: str  # "stop" | "length"
    tokens: int


class EndpointPolicy:
    """Completes jobs by asking an endpoint, `concurrency` requests at a time."""

    def __init__(
        self, endpoint: Endpoint, name: str, sampling: Sampling, seed: int, max_new_tokens: int
    ):
        self.endpoint, self.name = endpoint, name
        self.model = endpoint.served_model(name)
        self.sampling, self.seed, self.max_new_tokens = sampling, seed, max_new_tokens
        self.retried = 0
        self._lock = threading.Lock()

    def body(self, prompt: Any, prompt_index: int, sample: int) -> dict[str, Any]:
        engine = ENGINES[self.endpoint.engine]
        s = self.sampling
        body = {
            "model": self.model,
            "prompt": flatten(prompt),
            "n": 1,
            "max_tokens": self.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k or engine["top_k_off"],
            "seed": sample_seed(self.seed, prompt_index, sample),
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "repetition_penalty": 1.0,
            "min_p": 0.0,
            "ignore_eos": False,
            "skip_special_tokens": True,
            "stream": False,
        }
        if self.endpoint.stop_ids:
            body["stop_token_ids"] = list(self.endpoint.stop_ids)
        if engine["token_ids"]:
            body["return_token_ids"] = True
        return body

    def completions(self, jobs: Sequence[Any]) -> Iterator[list[tuple[int, Answer]]]:
        """(job number, answer) as requests finish, at most `concurrency` in flight and at most
        WINDOW x concurrency ahead of the first unfinished job."""
        limit = self.endpoint.concurrency
        pool = concurrent.futures.ThreadPoolExecutor(limit, thread_name_prefix=f"jaxrm-{self.name}")
        pending: dict[concurrent.futures.Future, int] = {}
        done: set[int] = set()
        first_missing, next_job = 0, 0
        try:
            while first_missing < len(jobs):
                while (
                    next_job < len(jobs)
                    and len(pending) < limit
                    and next_job < first_missing + WINDOW * limit
                ):
                    job = jobs[next_job]
                    future = pool.submit(self._ask, job.prompt, job.prompt_index, job.sample)
                    pending[future] = next_job
                    next_job += 1
                ready, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                finished = []
                for future in ready:
                    number = pending.pop(future)
                    finished.append((number, future.result()))  # a failure stops the run here
                    done.add(number)
                while first_missing in done:
                    done.remove(first_missing)
                    first_missing += 1
                yield finished
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _ask(self, prompt: Any, prompt_index: int, sample: int) -> Answer:
        """One sample, retried until the endpoint gives a usable reply or retries run out."""
        body = self.body(prompt, prompt_index, sample)
        url = self.endpoint.base + "/completions"
        problem = ""
        for attempt in range(self.endpoint.retries + 1):
            if attempt:
                with self._lock:
                    self.retried += 1
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
            try:
                reply = request_json(
                    "POST",
                    url,
                    body,
                    self.endpoint.headers(),
                    timeout=self.endpoint.timeout,
                    retries=0,
                )
            except ServerError as e:
                if e.status is not None and e.status < 500 and e.status != 429:
                    raise UserError(f"policy {self.name}: {e}") from None
                problem = e.message + ("" if e.status is None else f" (HTTP {e.status})")
                continue
            answer, problem = self._answer(reply)
            if answer is not None:
                return answer
        raise UserError(
            f"policy {self.name}: {url} failed {self.endpoint.retries + 1} times; last: {problem}"
        )

    def _answer(self, reply: dict[str, Any]) -> tuple[Answer | None, str]:
        choices = reply.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return None, f"expected one choice, got {str(choices)[:200]}"
        choice = choices[0]
        text, finish = choice.get("text"), choice.get("finish_reason")
        if not isinstance(text, str) or finish not in ("stop", "length"):
            return None, f"a choice without text or with finish_reason {finish!r}"
        field = ENGINES[self.endpoint.engine]["token_ids"]
        ids = choice.get(field) if field else None
        if isinstance(ids, list):
            return Answer(text, finish, len(ids)), ""
        usage = reply.get("usage")
        count = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if not isinstance(count, int):
            return None, "the reply gives neither token ids nor usage.completion_tokens"
        return Answer(text, finish, count), ""
