"""The request and response shapes of the engines reward models are called through.

Each dialect is read into a list of inputs (formatted texts or token ids) and answered from the
rewards of those inputs, so every endpoint scores with one code path. Field names, defaults and
shapes follow the engines' own servers (vLLM 0.10-0.34, SGLang 0.4-0.5, lmdeploy 0.9-0.16,
OpenRLHF's `serve_rm`); what differs between them is noted where it is read or written.

    vLLM      POST /pooling   {"input", "use_activation"?, "task"?}  data[i].data: a [score] per
                              token (token_classify), or [reward] with task "classify"
              POST /classify  {"input", "use_activation"?}  data[i].probs: [reward]
    lmdeploy  POST /pooling   {"input"}                     data[i].data: reward (`--pooling lmdeploy`)
    SGLang    POST /classify  {"text" | "input_ids"}        [{"embedding": [reward], "meta_info"}]
              POST /v1/embeddings {"input"}                 data[i].embedding: [reward]
    OpenRLHF  POST /get_reward {"query"}                    {"rewards", "scores", "extra_logs"}

Rewards are raw (the head's output, as POLAR and `jaxrm score` give them) unless a vLLM request
asks for `use_activation: true` (or the older `activation` / `softmax`): then sigmoid(reward), the
activation vLLM applies to a one-label head that has no `problem_type: regression`. A
multi-attribute head answers the vLLM and SGLang dialects with its outputs, one per attribute (as
those engines serve a `num_labels: K` export), and lmdeploy's and OpenRLHF's, which carry one
number, with the reward: the attributes' weighted sum.
"""

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxrm.http_server import RequestError

Input = str | list[int]


@dataclass
class Scored:
    """What the server did with one input and what the model said about it."""

    token_rewards: np.ndarray  # the reward at every token; the last one is the reward
    reward_token_added: bool  # the input did not end with the reward token, so it was appended
    truncated: bool  # longer than data.max_length: its start was dropped
    # A multi-attribute head's outputs at every token, [tokens, attributes]; None with one output.
    token_scores: np.ndarray | None = None

    @property
    def reward(self) -> float:
        return float(self.token_rewards[-1])

    @property
    def outputs(self) -> list[float]:
        """The head's outputs at the last token: the reward, or one per attribute."""
        if self.token_scores is None:
            return [self.reward]
        return [float(v) for v in self.token_scores[-1]]

    def token_outputs(self) -> list[list[float]]:
        """The head's outputs at every token."""
        if self.token_scores is None:
            return [[float(r)] for r in self.token_rewards]
        return self.token_scores.tolist()

    @property
    def tokens(self) -> int:
        return len(self.token_rewards)


def inputs_of(value: Any, field: str) -> list[Input]:
    """A vLLM / OpenAI `input`: a text, a list of texts, token ids or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if is_token_ids(value):
        return [_token_ids(value, field)]
    if isinstance(value, list) and value:
        for i, item in enumerate(value):
            if not isinstance(item, str) and not is_token_ids(item):
                raise RequestError(
                    400, f"{field}[{i}] must be a text or a non-empty list of token ids"
                )
        return [
            v if isinstance(v, str) else _token_ids(v, f"{field}[{i}]") for i, v in enumerate(value)
        ]
    raise RequestError(
        400, f"field '{field}' must be a text, a list of texts, token ids or lists of token ids"
    )


def is_token_ids(value: Any) -> bool:
    """A non-empty list of integers (whether they are valid ids is checked later)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _token_ids(ids: list, field: str) -> list[int]:
    negative = next((i for i in ids if i < 0), None)
    if negative is not None:
        raise RequestError(400, f"field '{field}': token id {negative} is negative")
    return list(ids)


def texts_of(body: dict, field: str) -> list[str]:
    values = body.get(field)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RequestError(400, f"field '{field}' must be a list of texts")
    return values


def activation_requested(body: dict) -> bool:
    """vLLM's `use_activation`, else its deprecated `activation` / `softmax`; default off (raw)."""
    for key in ("use_activation", "activation", "softmax"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise RequestError(400, f"field '{key}' must be true, false or null")
            return value
    return False


def pooling_task(body: dict) -> str | None:
    """vLLM's /pooling `task`: token_classify (the default here) or classify."""
    task = body.get("task")
    if task not in (None, "token_classify", "classify"):
        raise RequestError(400, f"task {task!r}: this server pools for token_classify or classify")
    return task


def refuse_chat(body: dict) -> None:
    if "messages" in body:
        raise RequestError(
            400,
            "chat 'messages' are not templated here; send the formatted text as 'input' "
            "(the reward model's own template, e.g. POLAR's prompt + reference + <|reward|> ...)",
        )


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _activated(values: list[float], activation: bool) -> list[float]:
    return [sigmoid(v) for v in values] if activation else values


def _usage(scored: Sequence[Scored]) -> dict[str, Any]:
    tokens = sum(s.tokens for s in scored)
    return {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def server_notes(scored: Sequence[Scored]) -> dict[str, list[int]]:
    """Indices of the inputs the server changed: where it appended the reward token, where it
    dropped the start of a text longer than data.max_length."""
    return {
        "reward_token_added": [i for i, s in enumerate(scored) if s.reward_token_added],
        "truncated": [i for i, s in enumerate(scored) if s.truncated],
    }


def _envelope(prefix: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
    }


def vllm_pooling(
    scored: Sequence[Scored], model: str, activation: bool, task: str | None
) -> dict[str, Any]:
    """vLLM's /pooling. By default the output of a token-level reward model (InternLM2's, POLAR's;
    vLLM's `token_classify`): a [score] per token, the reward at the last, which POLAR's client
    reads as `data[i]["data"][-1][0]`. `task: "classify"` gives what vLLM answers for a
    sequence-classification export: `data[i]["data"]` = [reward]."""

    def values(s: Scored) -> list:
        if task == "classify":
            return _activated(s.outputs, activation)
        return [_activated(v, activation) for v in s.token_outputs()]

    data = [{"index": i, "object": "pooling", "data": values(s)} for i, s in enumerate(scored)]
    notes = server_notes(scored)
    return {**_envelope("pool", model), "data": data, "usage": _usage(scored), "jaxrm": notes}


def lmdeploy_pooling(scored: Sequence[Scored], model: str) -> dict[str, Any]:
    """lmdeploy's /pooling: one raw float per input (POLAR's client reads `data[i]["data"]`)."""
    data = [{"index": i, "object": "pooling", "data": s.reward} for i, s in enumerate(scored)]
    usage = {k: v for k, v in _usage(scored).items() if k != "prompt_tokens_details"}
    return {**_envelope("pool", model), "data": data, "usage": usage, "jaxrm": server_notes(scored)}


def vllm_classify(
    scored: Sequence[Scored], model: str, activation: bool, labels: Sequence[str] = ("LABEL_0",)
) -> dict[str, Any]:
    """vLLM's /classify: `probs` holds the head's outputs (one for a reward head, one per
    attribute for a multi-attribute one, named by `labels`) and `label` names the largest, as
    vLLM names it from id2label; verl reads `data[-1]["probs"][-1]`."""
    data = [
        {
            "index": i,
            "label": labels[int(np.argmax(s.outputs))],
            "probs": _activated(s.outputs, activation),
            "num_classes": len(s.outputs),
        }
        for i, s in enumerate(scored)
    ]
    notes = server_notes(scored)
    return {**_envelope("classify", model), "data": data, "usage": _usage(scored), "jaxrm": notes}


def sglang_classify(scored: Sequence[Scored], single: bool, request_id: str | None) -> Any:
    """SGLang's native /classify (and /encode): a list of {"embedding": [reward], "meta_info"}
    (the head's outputs: one per attribute for a multi-attribute head), or one such object for a
    single text; POLAR's client reads `item["embedding"][0]`."""
    items = [
        {
            "embedding": s.outputs,
            "meta_info": {
                "id": request_id or uuid.uuid4().hex,
                "prompt_tokens": s.tokens,
                "reward_token_added": s.reward_token_added,
                "truncated": s.truncated,
            },
        }
        for s in scored
    ]
    return items[0] if single else items


def embeddings(scored: Sequence[Scored], model: str) -> dict[str, Any]:
    """SGLang's (OpenAI-shaped) /v1/embeddings for a reward model: `embedding` is [reward];
    verl reads `data[-1]["embedding"][-1]`."""
    data = [
        {"object": "embedding", "embedding": s.outputs, "index": i} for i, s in enumerate(scored)
    ]
    tokens = sum(s.tokens for s in scored)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "jaxrm": server_notes(scored),
    }


def get_reward(scored: Sequence[Scored]) -> dict[str, Any]:
    """OpenRLHF's remote reward model reply."""
    rewards = [s.reward for s in scored]
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}, **server_notes(scored)}


def group_normalized(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """GRPO's advantage of each response in its group: (r - mean) / (std + eps), with the sample
    standard deviation (torch's default, as verl and TRL compute it); 0 for a group of one."""
    values = np.asarray(rewards, np.float64)
    if len(values) < 2:
        return [0.0] * len(values)
    return ((values - values.mean()) / (values.std(ddof=1) + eps)).tolist()
