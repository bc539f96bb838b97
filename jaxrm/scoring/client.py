"""A standard-library client for `jaxrm serve`, light enough to import in RL workers.

    from jaxrm.scoring.client import RewardClient
    client = RewardClient("http://127.0.0.1:8000")   # token: argument or $JAXRM_SERVE_TOKEN
    client.score(prompts, responses, references)      # POST /score -> one float per item
    rewards, advantages = client.score_groups(groups) # POST /score_groups: GRPO groups

verl: use this file as a custom reward function (it needs only the standard library, so verl
can load it by path; `python -c "import jaxrm.scoring.client as c; print(c.__file__)"` prints
the path).
The server URL comes from reward_kwargs `url` or $JAXRM_REWARD_URL (default
http://127.0.0.1:8000). The response is `solution_str`, the reference is `ground_truth` and the
prompt is `extra_info["prompt"]` (else `extra_info["question"]`, else "").

    custom_reward_function.path=/path/to/jaxrm/scoring/client.py custom_reward_function.name=compute_score
    # or, one request per batch:
    reward_model.reward_manager=batch custom_reward_function.name=compute_score_batch
    +custom_reward_function.reward_kwargs.url=http://HOST:PORT

OpenRLHF: the server speaks its remote reward-model API on already formatted texts:
`--remote_rm_url http://HOST:PORT/get_reward`.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ServerError(RuntimeError):
    """A server refused, failed, kept failing or gave a malformed reply."""

    def __init__(self, where: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{where}: {message}" + ("" if status is None else f" (HTTP {status})"))
        self.status = status
        self.message = message


class RewardServerError(ServerError):
    """The reward server refused, failed, kept failing or gave a malformed reply."""


class RewardClient:
    """Calls a `jaxrm serve` server, retrying transient failures with jittered back-off."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_items: int = 256,
    ) -> None:
        if max_items < 1 or retries < 0:
            raise ValueError(f"need max_items >= 1 and retries >= 0, got {max_items}, {retries}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_items = max_items
        token = token if token is not None else os.environ.get("JAXRM_SERVE_TOKEN")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    def score(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        references: Sequence[Any] | None = None,
    ) -> list[float]:
        """One reward per (prompt, reference?, response); each a string or a list of messages."""
        lengths = {"prompts": len(prompts), "responses": len(responses)}
        if references is not None:
            lengths["references"] = len(references)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"score needs sequences of equal length, got {lengths}")
        items = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
        if references is not None:
            for item, reference in zip(items, references, strict=True):
                item["reference"] = reference
        return self.score_items(items)

    def score_items(self, items: Sequence[Mapping[str, Any]]) -> list[float]:
        """One reward per scoring row `{"prompt", "reference"?, "response"}`, in order."""
        return self._post_chunked("/score", "items", [dict(item) for item in items])

    def score_groups(
        self, groups: Sequence[Mapping[str, Any]]
    ) -> tuple[list[list[float]], list[list[float]]]:
        """(rewards, normalized) of groups `{"prompt", "reference"?, "responses": [...]}`: each
        response's reward and its group-normalised value ((r - mean) / (std + 1e-6)). The server
        computes a group's shared prefix once; groups go in requests of at most `max_items`
        responses (a larger group goes alone)."""
        rewards: list[list[float]] = []
        normalized: list[list[float]] = []
        for chunk in _group_chunks([dict(g) for g in groups], self.max_items):
            url = self.url + "/score_groups"
            reply = self._request("POST", "/score_groups", {"groups": chunk})
            for key, out in (("rewards", rewards), ("normalized", normalized)):
                values = reply.get(key)
                if not isinstance(values, list) or len(values) != len(chunk):
                    raise RewardServerError(url, f"expected {len(chunk)} groups of {key}")
                for group, value in zip(chunk, values, strict=True):
                    out.append(_checked_rewards({"rewards": value}, len(group["responses"]), url))
        return rewards, normalized

    def get_reward(self, texts: Sequence[str]) -> list[float]:
        """One reward per already formatted text (OpenRLHF's remote reward-model API)."""
        return self._post_chunked("/get_reward", "query", list(texts))

    def health(self) -> dict[str, Any]:
        """The server's `/health` reply, e.g. `{"status": "ok", ...}`."""
        return self._request("GET", "/health")

    def _post_chunked(self, path: str, key: str, values: list[Any]) -> list[float]:
        rewards: list[float] = []
        for start in range(0, len(values), self.max_items):
            chunk = values[start : start + self.max_items]
            reply = self._request("POST", path, {key: chunk})
            rewards.extend(_checked_rewards(reply, len(chunk), self.url + path))
        return rewards

    def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return request_json(
            method,
            self.url + path,
            body,
            self._headers,
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            error=RewardServerError,
        )


def request_json(
    method: str,
    url: str,
    body: Any,
    headers: Mapping[str, str],
    *,
    timeout: float,
    retries: int,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    error: type[ServerError] = ServerError,
) -> dict[str, Any]:
    """The JSON object a server answers to `body`, retrying connection failures, timeouts and
    429 / 5xx replies with jittered exponential back-off; another 4xx fails at once."""
    # verl hands over numpy scalars and arrays; .tolist() turns them into plain JSON values.
    data = None if body is None else json.dumps(body, default=_tolist).encode()
    last_error, last_status = "", None
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers=dict(headers), method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return _json_object(response.read(), url, error)
        except urllib.error.HTTPError as failure:
            message = _error_message(failure)
            if failure.code not in RETRY_STATUSES:
                raise error(f"{method} {url}", message, failure.code) from None
            last_error, last_status = message, failure.code
        except (OSError, http.client.HTTPException) as failure:
            last_error = str(getattr(failure, "reason", failure)) or repr(failure)
            last_status = None
        if attempt < retries:
            delay = min(max_backoff, backoff * 2**attempt)
            time.sleep(delay * random.uniform(0.5, 1.0))
    attempts = f"failed after {retries + 1} attempts; last error: {last_error}"
    raise error(f"{method} {url}", attempts if retries else last_error, last_status)


def _group_chunks(groups: list[dict], max_items: int) -> list[list[dict]]:
    chunks: list[list[dict]] = []
    size = max_items
    for group in groups:
        responses = group.get("responses")
        if not isinstance(responses, (list, tuple)) or not responses:
            raise ValueError("every group needs a non-empty list of 'responses'")
        group["responses"] = list(responses)
        if size + len(responses) > max_items:
            chunks.append([])
            size = 0
        chunks[-1].append(group)
        size += len(responses)
    return chunks


def _tolist(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


def _json_object(raw: bytes, url: str, error: type[ServerError]) -> dict[str, Any]:
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise error(url, f"reply is not a JSON object: {raw[:200]!r}")
    return reply


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read()
    except (OSError, http.client.HTTPException):
        return str(error.reason)
    try:
        detail = json.loads(raw)["error"]  # jaxrm's text, or OpenAI's {"message", "type", ...}
        return str(detail["message"] if isinstance(detail, dict) else detail)
    except (ValueError, TypeError, KeyError):
        return raw.decode(errors="replace")[:200] or str(error.reason)


def _checked_rewards(reply: Mapping[str, Any], expected: int, url: str) -> list[float]:
    rewards = reply.get("rewards")
    if not isinstance(rewards, list) or len(rewards) != expected:
        got = len(rewards) if isinstance(rewards, list) else repr(rewards)[:100]
        raise RewardServerError(url, f"expected {expected} rewards in the reply, got {got}")
    for value in rewards:
        if type(value) not in (int, float) or not math.isfinite(value):  # bool is no reward
            raise RewardServerError(url, f"a reward is not a finite number: {value!r}")
    return [float(value) for value in rewards]


_VERL_CLIENTS: dict[str, RewardClient] = {}


def _verl_client(url: str | None) -> RewardClient:
    url = url or os.environ.get("JAXRM_REWARD_URL") or DEFAULT_URL
    if url not in _VERL_CLIENTS:
        _VERL_CLIENTS[url] = RewardClient(url)
    return _VERL_CLIENTS[url]


def _verl_items(solutions: Sequence, truths: Sequence, infos: Sequence) -> list[dict]:
    items = []
    for solution, truth, info in zip(solutions, truths, infos, strict=True):
        info = info or {}
        prompt = info["prompt"] if "prompt" in info else info.get("question", "")
        items.append({"prompt": prompt, "reference": truth, "response": solution})
    return items


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> float:
    """verl's per-sample custom reward function; `url=` may come from reward_kwargs."""
    client = _verl_client(kwargs.get("url"))
    return client.score_items(_verl_items([solution_str], [ground_truth], [extra_info]))[0]


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """verl's batch custom reward function (`reward_model.reward_manager=batch`). Responses to
    the same prompt and reference (a GRPO group) go to /score_groups together, so the server
    computes their shared prefix once; the rewards come back raw, in the input order."""
    client = _verl_client(kwargs.get("url"))
    infos = [None] * len(solution_strs) if extra_infos is None else extra_infos
    items = _verl_items(solution_strs, ground_truths, infos)
    groups: dict[str, dict[str, Any]] = {}
    places: list[tuple[str, int]] = []
    for item in items:
        key = json.dumps([item["prompt"], item["reference"]], default=_tolist, sort_keys=True)
        group = groups.setdefault(
            key, {"prompt": item["prompt"], "reference": item["reference"], "responses": []}
        )
        places.append((key, len(group["responses"])))
        group["responses"].append(item["response"])
    order = list(groups)
    rewards, _ = client.score_groups([groups[key] for key in order])
    by_key = dict(zip(order, rewards, strict=True))
    return [by_key[key][k] for key, k in places]
