"""CodePMP preference pairs from a strong and a weak code model's responses (METHODS.md, 2).

    jaxrm data codepmp-pairs --descriptions desc.jsonl --strong strong.jsonl --weak weak.jsonl \\
        --out pairs.jsonl --min-comment-density 0.01

Descriptions and responses are joined by id in memory. Every pair left out is counted under its
reason (`DROP_REASONS`); nothing is dropped silently.
"""

import argparse
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jaxrm.data.code_text import comment_density, has_empty_code_block
from jaxrm.data.rows import BadRow
from jaxrm.data.sources import open_source
from jaxrm.errors import UserError
from jaxrm.storage import refuse_existing, write_jsonl

Row = dict[str, Any]
Spec = str | Sequence[str]


# Why a description did not become a pair; each is counted under the first reason that applies,
# checked in this order.
DROP_REASONS = (
    "missing_id",  # its id has no strong or no weak response
    "empty_prompt",
    "no_source",  # a source filter is set but the row has no "source"
    "length",
    "comment_density",
    "empty_response",
    "empty_code_block",
    "identical",
    "duplicate",
)


@dataclass(frozen=True)
class SourceFilter:
    """Bounds on the original code file; None leaves a side open."""

    min_comment_density: float | None = None
    max_comment_density: float | None = None
    min_source_chars: int | None = None
    max_source_chars: int | None = None

    def is_set(self) -> bool:
        return any(v is not None for v in vars(self).values())

    def check(
        self, name: Callable[[str], str] = lambda field: "--" + field.replace("_", "-")
    ) -> None:
        """UserError for bounds that make no sense; `name` spells a field as the user gave it
        (default: its command-line flag)."""
        low, high = self.min_comment_density, self.max_comment_density
        for side, value in (("min", low), ("max", high)):
            if value is not None and not 0 <= value <= 1:
                raise UserError(f"{name(side + '_comment_density')} must be in [0, 1], got {value}")
        for side, value in (("min", self.min_source_chars), ("max", self.max_source_chars)):
            if value is not None and value < 0:
                raise UserError(f"{name(side + '_source_chars')} must not be negative, got {value}")
        if low is not None and high is not None and low > high:
            raise UserError(
                f"{name('min_comment_density')} is larger than {name('max_comment_density')}"
            )
        if None not in (self.min_source_chars, self.max_source_chars) and (
            self.min_source_chars > self.max_source_chars
        ):
            raise UserError(f"{name('min_source_chars')} is larger than {name('max_source_chars')}")

    def reject_reason(self, source: str, language: str | None) -> str | None:
        if not _within(len(source), self.min_source_chars, self.max_source_chars):
            return "length"
        if self.min_comment_density is None and self.max_comment_density is None:
            return None
        density = comment_density(source, language)
        if not _within(density, self.min_comment_density, self.max_comment_density):
            return "comment_density"
        return None


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def codepmp_pairs(
    descriptions: Spec,
    strong: Spec,
    weak: Spec,
    *,
    min_comment_density: float | None = None,
    max_comment_density: float | None = None,
    min_source_chars: int | None = None,
    max_source_chars: int | None = None,
) -> tuple[list[Row], dict[str, int]]:
    """CodePMP pairs `{prompt, chosen, rejected}` and how many descriptions each reason dropped.

    Inputs (paths or globs, read through `open_source`): descriptions `{id, prompt, source?,
    language?}`, strong and weak responses `{id, response}`; ids are strings or integers, joined
    as text. The strong model's response is chosen, the weak one's rejected, in description
    order. Dropped and counted (CodePMP keeps only pairs where both sides hold code; the source
    bounds follow the comment-density filter of arXiv 2402.13013): see `DROP_REASONS`. Besides
    `kept` and those reasons, `unmatched_response` counts strong or weak ids that no description
    names. A malformed row or an id repeated within one input is an error naming file and line.
    """
    bounds = SourceFilter(
        min_comment_density, max_comment_density, min_source_chars, max_source_chars
    )
    bounds.check()
    described = _read_by_id(descriptions, "prompt", ("source", "language"))
    strong_rows = _read_by_id(strong, "response", ())
    weak_rows = _read_by_id(weak, "response", ())
    counts = dict.fromkeys(("kept", *DROP_REASONS), 0)
    seen: set[str] = set()
    pairs = []
    for key, (_, row) in described.items():
        if key not in strong_rows or key not in weak_rows:
            counts["missing_id"] += 1
            continue
        pair = {
            "prompt": row["prompt"],
            "chosen": strong_rows[key][1]["response"],
            "rejected": weak_rows[key][1]["response"],
        }
        reason = _drop_reason(row, pair, bounds, seen)
        counts[reason or "kept"] += 1
        if reason is None:
            pairs.append(pair)
    counts["unmatched_response"] = len((strong_rows.keys() | weak_rows.keys()) - described.keys())
    return pairs, counts


def _drop_reason(description: Row, pair: Row, bounds: SourceFilter, seen: set[str]) -> str | None:
    """The first reason in `DROP_REASONS` order to leave this pair out; `seen` records hashes."""
    if not pair["prompt"].strip():
        return "empty_prompt"
    if bounds.is_set():
        if description.get("source") is None:
            return "no_source"
        reason = bounds.reject_reason(description["source"], description.get("language"))
        if reason:
            return reason
    chosen, rejected = pair["chosen"], pair["rejected"]
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if has_empty_code_block(chosen) or has_empty_code_block(rejected):
        return "empty_code_block"
    if chosen.strip() == rejected.strip():
        return "identical"
    digest = _content_hash(pair)
    if digest in seen:
        return "duplicate"
    seen.add(digest)
    return None


def _content_hash(pair: Row) -> str:
    """sha256 of the JSON list [prompt, chosen, rejected]: field boundaries cannot blur."""
    text = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_by_id(
    spec: Spec, text_field: str, optional: tuple[str, ...]
) -> dict[str, tuple[str, Row]]:
    """Rows of `spec` keyed by id (as text), each `(where, row)`, after checking their fields."""
    source = open_source(spec)
    rows: dict[str, tuple[str, Row]] = {}
    for index in range(len(source)):
        where, row = source.read(index)
        key = _check_keyed_row(row, text_field, optional, where)
        if key in rows:
            raise BadRow(f"{where}: id {key!r} already appears at {rows[key][0]}")
        rows[key] = (where, row)
    return rows


def _check_keyed_row(row: Any, text_field: str, optional: tuple[str, ...], where: str) -> str:
    if not isinstance(row, dict):
        raise BadRow(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    key = row.get("id")
    if key is None:
        raise BadRow(f"{where}: field 'id' is missing (a row needs id, {text_field})")
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise BadRow(f"{where}: field 'id' must be a string or an integer, got {key!r}")
    for name in (text_field, *optional):
        value = row.get(name)
        if value is None and name == text_field:
            raise BadRow(f"{where}: field '{name}' is missing (a row needs id, {text_field})")
        if value is not None and not isinstance(value, str):
            raise BadRow(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return str(key)


# ----------------------------------------------------------------------------- command line


def add_command(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `codepmp-pairs` under `jaxrm data`."""
    codepmp = data_commands.add_parser(
        "codepmp-pairs",
        help="build CodePMP preference pairs from strong and weak code-model responses",
        description="Join descriptions {id, prompt, source?, language?} with a strong and a "
        "weak model's responses {id, response} by id and write pairs {prompt, chosen "
        "(strong), rejected (weak)}. Pairs with a missing id, an empty response or code block, "
        "identical responses, repeated content, or a source file outside the bounds below "
        "are dropped and counted.",
    )
    codepmp.add_argument(
        "--descriptions", required=True, metavar="FILE", help="file or glob: the prompts"
    )
    codepmp.add_argument(
        "--strong",
        required=True,
        metavar="FILE",
        help="file or glob: responses of the strong model",
    )
    codepmp.add_argument(
        "--weak", required=True, metavar="FILE", help="file or glob: responses of the weak model"
    )
    codepmp.add_argument("--out", required=True, metavar="FILE", help="new JSONL file to write")
    density = "comment characters / non-whitespace characters of the description's source"
    codepmp.add_argument(
        "--min-comment-density", type=float, metavar="X", help=f"keep >= X: {density}"
    )
    codepmp.add_argument(
        "--max-comment-density", type=float, metavar="X", help=f"keep <= X: {density}"
    )
    codepmp.add_argument(
        "--min-source-chars", type=int, metavar="N", help="keep sources of >= N characters"
    )
    codepmp.add_argument(
        "--max-source-chars", type=int, metavar="N", help="keep sources of <= N characters"
    )
    codepmp.set_defaults(run=cmd_codepmp_pairs)


def cmd_codepmp_pairs(args: argparse.Namespace) -> None:
    refuse_existing(args.out)
    pairs, counts = codepmp_pairs(
        args.descriptions,
        args.strong,
        args.weak,
        min_comment_density=args.min_comment_density,
        max_comment_density=args.max_comment_density,
        min_source_chars=args.min_source_chars,
        max_source_chars=args.max_source_chars,
    )
    write_jsonl(pairs, args.out)
    dropped = ", ".join(f"{reason} {counts[reason]}" for reason in DROP_REASONS)
    print(
        f"wrote {counts['kept']} pairs to {args.out}; dropped: {dropped}; "
        f"responses without a description: {counts['unmatched_response']}"
    )
