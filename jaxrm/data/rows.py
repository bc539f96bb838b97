"""The data formats' rows, checked: a malformed row is a `BadRow` naming file, line and field.

    row = check_row(row, "polar", where)

ARCHITECTURE.md, "Data formats": preference rows (polar, pairwise, codepmp), trajectory rows,
scoring rows and prompt rows. Text fields are strings or lists of {role, content} messages.
"""

import collections
import math
import re
from collections.abc import Sequence
from typing import Any

from jaxrm.errors import UserError

# Required and optional fields of each kind of row (ARCHITECTURE.md, "Data formats"). A preference
# row also needs its responses: "chosen" and "rejected", or "ranked" (2 or more, best first).
ROW_KINDS = {
    "polar": (("prompt", "reference"), ("category", "margin", "wrapper")),
    "pairwise": (("prompt",), ("category", "margin", "wrapper", "reference")),
    "codepmp": (("prompt",), ("category", "margin", "wrapper", "reference")),
    "regression": (("prompt", "response", "score"), ("category", "wrapper")),
    "prm": (("prompt", "steps", "labels"), ("category", "wrapper")),
    "process_score": (("prompt", "steps"), ("labels", "category", "wrapper")),
    "trajectory": (("prompt", "policy", "response"), ()),
    "score": (("prompt", "response"), ("reference", "wrapper")),
    "prompt": (("prompt",), ()),
}
PREFERENCE_KINDS = {"polar", "pairwise", "codepmp"}
# Fields that must hold some text: a candidate the model scores.
NON_EMPTY = {"chosen", "rejected", "response"}
TEXT_FIELDS = {"prompt", "reference", "chosen", "rejected", "response"}


class BadRow(UserError):
    """A malformed row; the message names the file, the line (or record) and the field."""


# A BadRow message: "FILE:LINE: reason" or "FILE row|record|example N: reason" (data/sources.py).
BAD_ROW_MESSAGE = re.compile(
    r"(?P<file>.+?)(?::(?P<line>\d+)| (?P<unit>row|record|example) (?P<index>\d+)): (?P<error>.*)",
    re.DOTALL,
)


def describe_bad_row(message: str) -> dict[str, Any]:
    """A BadRow's message as {"file", "line" (or "row", "record", "example"), "kind", "error"}:
    `kind` is what went wrong without the row's particulars, e.g. "field 'chosen' is missing"."""
    match = BAD_ROW_MESSAGE.fullmatch(message)
    if match is None:
        return {"kind": _kind(message), "error": message}
    place = {"line": int(match["line"])} if match["line"] else {match["unit"]: int(match["index"])}
    return {"file": match["file"], **place, "kind": _kind(match["error"]), "error": match["error"]}


def _kind(error: str) -> str:
    return re.split(r" \(|, got ", error, maxsplit=1)[0]


def count_kinds(counts: "collections.Counter[str]") -> str:
    """The counts of kinds of bad rows, most frequent first: "2x field 'chosen' is missing, 1x
    not valid JSON"."""
    return ", ".join(f"{n}x {kind}" for kind, n in counts.most_common())


def check_row(row: Any, kind: str, where: str, attributes: Sequence[str] = ()) -> dict[str, Any]:
    """`row` if it is a valid row of `kind`; otherwise BadRow.

    A regression row for a multi-attribute head (`attributes`, the head's names in order) comes
    back with its `score` as a list of one number (or None, not rated) per attribute."""
    if not isinstance(row, dict):
        raise BadRow(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if kind in ("prm", "process_score") and row.get("steps") is None:
        row = {**row, "steps": row.get("completions")}  # TRL's name for the steps
    if kind == "regression" and attributes:
        row = {**row, "score": attribute_scores(row, attributes, where)}
    required, optional = ROW_KINDS[kind]
    needs = ", ".join(required)
    if kind in PREFERENCE_KINDS:
        needs += " and its responses: chosen and rejected, or ranked"
        required = (*required, *_response_fields(row))
    for field in required:
        if field not in row or row[field] is None:
            raise BadRow(f"{where}: field '{field}' is missing (a {kind} row needs {needs})")
    for field in (*required, *optional):
        value = row.get(field)
        if value is None:
            continue
        if field in TEXT_FIELDS:
            _check_text(value, field, where)
            if field in NON_EMPTY and not _has_text(value):
                raise BadRow(f"{where}: field '{field}' is empty")
        elif field == "ranked":
            _check_ranked(row, where)
        elif field == "steps":
            _check_steps(row, where)
        elif field == "score" and kind == "regression" and attributes:
            continue  # checked per attribute
        elif field in ("margin", "score") and not _is_finite_number(value):
            raise BadRow(f"{where}: field '{field}' must be a finite number, got {value!r}")
        elif field == "wrapper" and value not in ("sft", "pretrain"):
            raise BadRow(f"{where}: field 'wrapper' must be 'sft' or 'pretrain', got {value!r}")
        elif field in ("category", "policy") and not isinstance(value, str):
            raise BadRow(f"{where}: field '{field}' must be a string, got {value!r}")
    return row


def attribute_scores(row: dict[str, Any], attributes: Sequence[str], where: str) -> list:
    """A row's score per attribute, None where it is not rated: from its `score` (a dict by
    attribute name, or a list in the head's order) or, as HelpSteer rows carry them, from fields
    named after the attributes."""
    score = row.get("score")
    if score is None:
        score = {name: row[name] for name in attributes if name in row}
        if not score:
            raise BadRow(
                f"{where}: field 'score' is missing (a regression row needs a score per "
                f"attribute: a 'score' object or fields named {', '.join(attributes)})"
            )
    if isinstance(score, dict):
        unknown = [key for key in score if key not in attributes]
        if unknown:
            raise BadRow(
                f"{where}: field 'score' names {unknown[0]!r}, not among the model's attributes "
                f"({', '.join(attributes)})"
            )
        values = [score.get(name) for name in attributes]
    elif isinstance(score, list):
        if len(score) != len(attributes):
            raise BadRow(
                f"{where}: field 'score' holds {len(score)} values; the model has "
                f"{len(attributes)} attributes ({', '.join(attributes)})"
            )
        values = list(score)
    elif len(attributes) == 1:
        values = [score]
    else:
        raise BadRow(
            f"{where}: field 'score' must be an object or a list of {len(attributes)} numbers "
            f"(one per attribute: {', '.join(attributes)}), got {score!r}"
        )
    for name, value in zip(attributes, values, strict=True):
        if value is not None and not _is_finite_number(value):
            raise BadRow(
                f"{where}: the score of attribute '{name}' must be a finite number or null, "
                f"got {value!r}"
            )
    if all(value is None for value in values):
        raise BadRow(f"{where}: field 'score' rates no attribute")
    return [None if value is None else float(value) for value in values]


def _response_fields(row: dict[str, Any]) -> tuple[str, ...]:
    """The fields that hold a preference row's responses ("ranked" unless it has a pair)."""
    paired = any(row.get(f) is not None for f in ("chosen", "rejected"))
    return ("chosen", "rejected") if paired and row.get("ranked") is None else ("ranked",)


def _check_ranked(row: dict[str, Any], where: str) -> None:
    ranked = row["ranked"]
    paired = [f for f in ("chosen", "rejected") if row.get(f) is not None]
    if paired:
        raise BadRow(
            f"{where}: field 'ranked' cannot go with '{paired[0]}' (give ranked, or chosen and "
            "rejected)"
        )
    if not isinstance(ranked, list) or len(ranked) < 2:
        raise BadRow(f"{where}: field 'ranked' must be a list of 2 or more responses, best first")
    for i, response in enumerate(ranked):
        _check_text(response, f"ranked[{i}]", where)
        if not _has_text(response):
            raise BadRow(f"{where}: field 'ranked[{i}]' is empty")


def _check_steps(row: dict[str, Any], where: str) -> None:
    """A process-reward row's steps (strings) and, where given, one label per step: true /
    false or a probability that the step is correct."""
    steps, labels = row["steps"], row.get("labels")
    if not isinstance(steps, list) or not steps:
        raise BadRow(f"{where}: field 'steps' must be a non-empty list of strings")
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step:
            raise BadRow(f"{where}: field 'steps[{i}]' must be a non-empty string, got {step!r}")
    if labels is None:
        return
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise BadRow(
            f"{where}: field 'labels' must be a list of one label per step ({len(steps)}), "
            f"got {labels!r}"
        )
    for i, label in enumerate(labels):
        if not (isinstance(label, bool) or (_is_finite_number(label) and 0 <= label <= 1)):
            raise BadRow(
                f"{where}: field 'labels[{i}]' must be true, false or a number in [0, 1], "
                f"got {label!r}"
            )


def _check_text(value: Any, field: str, where: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise BadRow(
                    f"{where}: field '{field}' message {i} must be an object with a string "
                    "'content'"
                )
        return
    raise BadRow(
        f"{where}: field '{field}' must be a string or a non-empty list of "
        f"{{role, content}} messages, got {type(value).__name__}"
    )


def _has_text(value: str | list[dict]) -> bool:
    return bool(value) if isinstance(value, str) else any(m["content"] for m in value)


def _is_finite_number(value: Any) -> bool:
    """A number that stays finite in float32, as the loss computes with it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


FLOAT32_MAX = 3.4028234663852886e38
