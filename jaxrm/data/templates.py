"""Row -> token sequences, exactly as the published models saw them (METHODS.md).

A preference row's candidates are its chosen and rejected responses, or its "ranked" list; each
gives one sequence, best first.

POLAR (objective `polar`), for each candidate C of a row:

    BOS + P + SEP + R + <|reward|> + P + SEP + C, then the reward token id appended

as xtuner builds it: P, R and C are encoded on their own (with BOS, which counts towards their
length), R and C keep their first `max_response_length` tokens, P keeps its last
(max_length - 4 - len(R) - len(longest C)) // 2 tokens, each piece is decoded back to text, and the
assembled text is encoded once. SEP is "" for the "pretrain" wrapper and next to an empty piece.
Two decisions of ours, where xtuner has no answer: the response cap is at most half the budget (so
the prompt budget is never negative), and a prompt budget of 0 keeps no prompt token (xtuner's
`ids[-0:]` keeps them all). Should re-encoding the assembled text still overflow `max_length`
(decoded pieces can re-encode longer), the prompt gives way, then the responses, until it fits.

Pairwise, CodePMP and regression (one response, its score the target): BOS + P + SEP, then the
response, then the reward token. The prompt and the
response are encoded apart, so the response tokens (the CodePMP LM-loss targets of the best
response) and the shared prompt are exact token spans. The response keeps its head, the prompt its
tail.

Process rewards (objective `prm`, rows {prompt, steps, labels}): BOS + P + SEP, then for each step
its text + `step_separator` + the reward token, where that step's reward is read. Each step is
encoded apart, so a step's reward token is an exact place. The first `max_steps` steps are kept,
then as many as fit `max_length` with the prompt's tail taking at most half of it; a first step
too long for the rest keeps its head.
"""

import dataclasses
import math
from typing import Any

import numpy as np

from jaxrm.data.tokenizer import Tokenizer
from jaxrm.errors import UserError

POLAR_RESERVED = 4  # BOS, <|reward|>, the reward token and a spare, as in xtuner


@dataclasses.dataclass
class Example:
    """One training example: a token sequence per candidate, best first (2 for a chosen /
    rejected row, one per response of a "ranked" row).

    `lm_mask` marks, in `sequences[0]`, the tokens that are LM-loss targets (CodePMP); `target`
    is the score a regression example's one sequence should get (per attribute for a
    multi-attribute head, NaN where not rated); `reads` are the places in
    `sequences[0]` where a process-reward example's steps are judged, `labels` their labels.
    """

    sequences: list[np.ndarray]
    lm_mask: np.ndarray | None = None
    margin: float = 0.0
    target: float | np.ndarray = 0.0
    reads: np.ndarray | None = None
    labels: np.ndarray | None = None


def regression_target(score: float | list | None) -> float | np.ndarray:
    """A checked regression row's score as a target: a number, or one per attribute with NaN
    where the row does not rate it (a scoring row has none: 0)."""
    if isinstance(score, list):
        return np.asarray([math.nan if v is None else v for v in score], np.float32)
    return float(score or 0.0)


def responses(row: dict[str, Any]) -> list[Any]:
    """A checked preference row's responses, best first: its "ranked" list, or chosen, rejected."""
    ranked = row.get("ranked")
    return [row["chosen"], row["rejected"]] if ranked is None else ranked


def flatten(text: str | list[dict]) -> str:
    """A text field: a string, or chat messages whose contents are joined with newlines."""
    return text if isinstance(text, str) else "\n".join(m["content"] for m in text)


class Template:
    """Applies one objective's template with one tokenizer and one set of data settings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        objective: str,
        *,
        max_length: int,
        max_response_length: int = 4096,
        wrapper: str = "sft",
        separator: str = "\n",
        reward_marker: str | int = "<|reward|>",
        reward_token: str | int | None = None,
        step_separator: str = "\n",
        max_steps: int = 16,
    ):
        self.tokenizer = tokenizer
        self.objective = objective
        self.max_length = max_length
        self.max_response_length = max_response_length
        self.wrapper = wrapper
        self.separator = separator
        self.step_separator = step_separator
        self.max_steps = max_steps
        if reward_token is None:
            raise UserError(
                "no reward token: set data.reward_token (a token string or id) or "
                "model.reward_token_id"
            )
        self.reward_id = tokenizer.resolve(reward_token, "data.reward_token")
        self.marker = reward_marker
        if objective == "polar":
            self.marker_id = tokenizer.resolve(reward_marker, "data.reward_marker")
        self.special_prefix = _special_prefix(tokenizer)

    def __call__(self, row: dict[str, Any]) -> Example:
        wrapper = row.get("wrapper")
        if self.objective == "prm":
            sequence, reads = self.process(row["prompt"], row["steps"], wrapper)
            labels = np.asarray(row["labels"][: len(reads)], np.float32)
            return Example([sequence], reads=reads, labels=labels)
        if self.objective == "regression":
            sequences, _ = self.pairwise(row["prompt"], [row["response"]], wrapper)
            return Example(sequences, target=regression_target(row.get("score")))
        candidates = responses(row)
        if self.objective == "polar":
            sequences = self.polar(row["prompt"], row["reference"], candidates, wrapper)
            return Example(sequences, margin=float(row.get("margin") or 0.0))
        sequences, response_starts = self.pairwise(row["prompt"], candidates, wrapper)
        mask = None
        if self.objective == "codepmp":
            mask = np.zeros(len(sequences[0]), np.int8)
            mask[response_starts[0] : len(sequences[0]) - 1] = 1
        return Example(sequences, lm_mask=mask, margin=float(row.get("margin") or 0.0))

    def polar(
        self, prompt: Any, reference: Any, candidates: list[Any], wrapper: str | None = None
    ) -> list[np.ndarray]:
        """The token sequence of each candidate, judged against `reference`."""
        wrapper = wrapper or self.wrapper
        encode = self.tokenizer.encode
        prompt_ids = encode(flatten(prompt), add_special_tokens=True)
        responses = [encode(flatten(r), add_special_tokens=True) for r in (reference, *candidates)]
        cap = min(self.max_response_length, (self.max_length - POLAR_RESERVED) // 2)
        prompt_budget = None
        while cap > 1:
            sequences, prompt_budget = self._polar_fit(
                prompt_ids, [r[:cap] for r in responses], wrapper, prompt_budget
            )
            overflow = max(map(len, sequences)) - self.max_length
            if overflow <= 0:
                return sequences
            # Re-encoding the decoded pieces came out longer: the prompt gives way first.
            if prompt_budget > 0:
                prompt_budget = max(0, prompt_budget - max(1, overflow // 2))
            else:
                cap, prompt_budget = cap - max(1, overflow // 2), None
        raise UserError(
            f"a POLAR example does not fit data.max_length ({self.max_length}) even with "
            "nothing left of its prompt and responses; raise data.max_length"
        )

    def _polar_fit(
        self,
        prompt_ids: list[int],
        responses: list[list[int]],
        wrapper: str,
        prompt_budget: int | None,
    ) -> tuple[list[np.ndarray], int]:
        """Sequences from the truncated reference and candidates (`responses`, in that order)."""
        reference_ids, *candidate_ids = responses
        if prompt_budget is None:
            budget = self.max_length - POLAR_RESERVED
            prompt_budget = (budget - len(reference_ids) - max(map(len, candidate_ids))) // 2
        kept = prompt_ids[max(0, len(prompt_ids) - prompt_budget) :] if prompt_budget > 0 else []
        decode = self.tokenizer.decode
        prompt_text, reference_text = decode(kept), decode(reference_ids)
        sequences = [
            self._polar_sequence(prompt_text, reference_text, decode(ids), wrapper)
            for ids in candidate_ids
        ]
        return sequences, prompt_budget

    def _polar_sequence(
        self, prompt: str, reference: str, candidate: str, wrapper: str
    ) -> np.ndarray:
        reference_part = self._join(prompt, reference, wrapper)
        candidate_part = self._join(prompt, candidate, wrapper)
        encode = self.tokenizer.encode
        if isinstance(self.marker, str):
            ids = encode(reference_part + self.marker + candidate_part, add_special_tokens=True)
        else:
            ids = [*encode(reference_part, add_special_tokens=True), self.marker_id]
            ids += encode(candidate_part)
        return np.asarray([*ids, self.reward_id], np.int32)

    def _join(self, prompt: str, response: str, wrapper: str) -> str:
        if wrapper == "pretrain" or not response:
            return prompt + response
        return prompt + self.separator + response

    def pairwise(
        self, prompt: Any, responses: list[Any], wrapper: str | None = None
    ) -> tuple[list[np.ndarray], list[int]]:
        """(a token sequence per response, where each response's tokens start)."""
        wrapper = wrapper or self.wrapper
        encode = self.tokenizer.encode
        budget = self.max_length - 1 - len(self.special_prefix)
        cap = min(self.max_response_length, budget // 2)
        prompt_text = flatten(prompt)
        if prompt_text and wrapper != "pretrain":
            prompt_text += self.separator
        response_ids = [encode(flatten(r))[:cap] for r in responses]
        prompt_ids = encode(prompt_text)
        keep = budget - max(map(len, response_ids))
        prompt_ids = self.special_prefix + (
            prompt_ids[max(0, len(prompt_ids) - keep) :] if keep else []
        )
        sequences = [np.asarray([*prompt_ids, *r, self.reward_id], np.int32) for r in response_ids]
        return sequences, [len(prompt_ids)] * len(sequences)

    def process(
        self, prompt: Any, steps: list[str], wrapper: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(the token sequence of a solution's steps, the index of each kept step's reward
        token in it)."""
        wrapper = wrapper or self.wrapper
        encode = self.tokenizer.encode
        budget = self.max_length - len(self.special_prefix)
        prompt_text = flatten(prompt)
        if prompt_text and wrapper != "pretrain":
            prompt_text += self.separator
        prompt_ids = encode(prompt_text)
        room = budget - min(len(prompt_ids), budget // 2)
        kept: list[list[int]] = []
        used = 0
        for step in steps[: self.max_steps]:
            ids = [*encode(step + self.step_separator), self.reward_id]
            if used + len(ids) > room:
                if not kept:
                    kept, used = [[*ids[: room - 1], self.reward_id]], room
                break
            kept.append(ids)
            used += len(ids)
        keep = budget - used
        prompt_ids = self.special_prefix + (
            prompt_ids[max(0, len(prompt_ids) - keep) :] if keep > 0 else []
        )
        reads = len(prompt_ids) + np.cumsum([len(ids) for ids in kept]) - 1
        sequence = [*prompt_ids, *(i for ids in kept for i in ids)]
        return np.asarray(sequence, np.int32), reads.astype(np.int32)


def _special_prefix(tokenizer: Tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when adding special tokens (BOS or nothing)."""
    plain = tokenizer.encode("a")
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []
