"""Building pre-training datasets: POLAR triples and CodePMP pairs (METHODS.md, sections 1-3).

    jaxrm data polar-triples "gen/*.jsonl" --out triples.jsonl --seed 0 --per-prompt 2
    jaxrm data codepmp-pairs --descriptions desc.jsonl --strong strong.jsonl --weak weak.jsonl \\
        --out pairs.jsonl --min-comment-density 0.01

Both builders hold their inputs in memory: they join and group rows across whole files.
Nothing is dropped silently: POLAR inputs that cannot form a triple are errors naming file and
line, and every CodePMP pair left out is counted under its reason.
"""

import argparse
import hashlib
import json
import os
import random
import re
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxrm.errors import UserError
from jaxrm.sources import BadRow, check_row, open_source

Row = dict[str, Any]
Spec = str | Sequence[str]


# ----------------------------------------------------------------------------- POLAR triples


@dataclass
class _Prompt:
    """The trajectories of one prompt: `samples[policy]` lists its responses in input order."""

    prompt: Any
    first_where: str
    samples: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class _Usage:
    """How often each policy has served as A (reference + chosen) and as B (rejected)."""

    as_a: Counter = field(default_factory=Counter)
    as_b: Counter = field(default_factory=Counter)


def polar_triples(
    rows: Iterable[tuple[str, Any]], seed: int, per_prompt: int = 1, counts: Counter | None = None
) -> list[Row]:
    """POLAR pre-training triples from trajectory rows `(where, {prompt, policy, response})`.

    For each prompt (in order of first appearance) `per_prompt` times: draw a policy A with at
    least two samples and a different policy B; reference and chosen are two different samples
    of A, rejected is a sample of B. So that no policy dominates either role, A is the eligible
    policy used least often as A so far (over all prompts), B likewise; ties go to a seeded draw.
    Within a prompt, (reference, chosen) sample pairs repeat only once all have been used.
    A prompt answered by one policy only, or by no policy twice, is an error naming its first
    row: it cannot form a triple, and skipping it would hide a generation failure. An empty
    response (a policy that stopped at once: `jaxrm generate` writes those) is left out and
    counted in `counts["empty_responses"]`.
    """
    if per_prompt < 1:
        raise UserError(f"--per-prompt must be at least 1, got {per_prompt}")
    rng = random.Random(seed)
    usage = _Usage()
    triples = []
    for group in _group_by_prompt(rows, Counter() if counts is None else counts):
        _check_can_form_triple(group)
        used_pairs: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for _ in range(per_prompt):
            triples.append(_draw_triple(group, used_pairs, usage, rng))
    return triples


def prompt_key(prompt: Any) -> str:
    """A canonical JSON text of a prompt: equal message lists give equal keys."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _group_by_prompt(rows: Iterable[tuple[str, Any]], counts: Counter) -> list[_Prompt]:
    """Trajectories grouped by prompt, empty responses left out and counted."""
    groups: dict[str, _Prompt] = {}
    counts["empty_responses"] += 0
    for where, row in rows:
        if isinstance(row, dict) and row.get("response") == "":
            counts["empty_responses"] += 1
            continue
        row = check_row(row, "trajectory", where)
        group = groups.setdefault(prompt_key(row["prompt"]), _Prompt(row["prompt"], where))
        group.samples.setdefault(row["policy"], []).append(row["response"])
    return list(groups.values())


def _check_can_form_triple(group: _Prompt) -> None:
    policies = sorted(group.samples)
    about = f"{group.first_where}: prompt {_excerpt(group.prompt)}"
    if len(policies) < 2:
        raise UserError(
            f"{about} has responses from one policy only ('{policies[0]}'); a POLAR triple needs "
            "a second policy for the rejected response"
        )
    if not _policies_with_two_samples(group):
        singles = ", ".join(f"'{p}'" for p in policies)
        raise UserError(
            f"{about} has no policy with two samples ({singles}: only one sample each); the "
            "reference and the chosen response must be two samples of one policy"
        )


def _policies_with_two_samples(group: _Prompt) -> list[str]:
    return sorted(p for p, samples in group.samples.items() if len(samples) >= 2)


def _draw_triple(
    group: _Prompt,
    used_pairs: dict[str, set[tuple[int, int]]],
    usage: _Usage,
    rng: random.Random,
) -> Row:
    two_samples = _policies_with_two_samples(group)
    fresh = [p for p in two_samples if len(used_pairs[p]) < _pair_count(len(group.samples[p]))]
    policy_a = _least_used(fresh or two_samples, usage.as_a, rng)
    policy_b = _least_used([p for p in sorted(group.samples) if p != policy_a], usage.as_b, rng)
    reference, chosen = _draw_pair(len(group.samples[policy_a]), used_pairs[policy_a], rng)
    rejected = rng.randrange(len(group.samples[policy_b]))
    usage.as_a[policy_a] += 1
    usage.as_b[policy_b] += 1
    return {
        "prompt": group.prompt,
        "reference": group.samples[policy_a][reference],
        "chosen": group.samples[policy_a][chosen],
        "rejected": group.samples[policy_b][rejected],
        "chosen_policy": policy_a,
        "rejected_policy": policy_b,
    }


def _pair_count(n: int) -> int:
    """How many ordered (reference, chosen) pairs `n` samples make."""
    return n * (n - 1)


def _least_used(candidates: list[str], counts: Counter, rng: random.Random) -> str:
    fewest = min(counts[p] for p in candidates)
    return rng.choice([p for p in candidates if counts[p] == fewest])


def _draw_pair(n: int, used: set[tuple[int, int]], rng: random.Random) -> tuple[int, int]:
    """Two different sample indices, a pair not yet in `used` while there is one; recorded."""
    fresh_left = len(used) < _pair_count(n)
    while True:
        first, second = rng.sample(range(n), 2)
        pair = (first, second)
        if not (fresh_left and pair in used):
            used.add(pair)
            return pair


def _excerpt(prompt: Any, width: int = 40) -> str:
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return repr(text if len(text) <= width else text[:width] + "...")


# ----------------------------------------------------------------------------- CodePMP pairs

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


# A fence opens with three or more backticks or tildes; a backtick fence's info string holds no
# backtick (CommonMark), so ```x``` on one line is inline code, not a block.
_FENCE_OPEN = re.compile(r"^\s*(`{3,}(?!.*`)|~{3,})")


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text; an unclosed one runs to the end."""
    blocks: list[str] = []
    fence, lines = None, []
    for line in text.splitlines():
        if fence is None:
            opening = _FENCE_OPEN.match(line)
            if opening:
                fence, lines = opening.group(1), []
        elif _closes(line, fence):
            blocks.append("\n".join(lines))
            fence = None
        else:
            lines.append(line)
    if fence is not None:
        blocks.append("\n".join(lines))
    return blocks


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and stripped == fence[0] * len(stripped)


def has_empty_code_block(text: str) -> bool:
    """Whether a response announces code it does not give: any fenced block with no content."""
    return any(not block.strip() for block in code_blocks(text))


# ----------------------------------------------------------------------------- comment density

# The language names (lower-cased) of each comment syntax; other names are guessed from the text.
_LANGUAGES = {
    "python": "python py",
    "hash": "shell sh bash zsh ruby rb perl r yaml toml makefile dockerfile",
    "c": "c h c++ cpp cc hpp c# csharp cs java javascript js jsx typescript ts tsx go golang "
    "rust rs kotlin kt swift scala dart php objective-c objc",
}
_SYNTAX_OF_LANGUAGE = {
    name: syntax for syntax, names in _LANGUAGES.items() for name in names.split()
}
_PYTHON_LINE = re.compile(
    r"^\s*((def|class|if|elif|else|for|while|try|except|finally|with)\b[^\n]*:\s*(#.*)?$"
    r"|import \w|from [\w.]+ import )",
    re.MULTILINE,
)
_C_LINE = re.compile(r"[;{}]\s*$|^\s*(//|/\*)", re.MULTILINE)
_C_PREPROCESSOR = re.compile(r"^\s*#\s*(include|define|ifn?def|pragma)\b", re.MULTILINE)


def comment_syntax(source: str, language: str | None = None) -> str:
    """'python', 'c' (// and /* */) or 'hash' (# to end of line) for this file."""
    known = _SYNTAX_OF_LANGUAGE.get((language or "").strip().lower())
    if known:
        return known
    if source.startswith("#!"):
        return "python" if "python" in source.split("\n", 1)[0] else "hash"
    if _C_PREPROCESSOR.search(source):
        return "c"
    python, c_like = len(_PYTHON_LINE.findall(source)), len(_C_LINE.findall(source))
    if python and python >= c_like:
        return "python"
    return "c" if c_like else "hash"


def comment_density(source: str, language: str | None = None) -> float:
    """Share of comment characters among the non-whitespace characters of a source file.

    Comments are `#` lines (Python, shell, Ruby...), `//` lines and `/* */` blocks (C family,
    JS, Go, Rust, Java), and Python docstrings (a string literal standing alone as a statement);
    their delimiters count as comment characters. Markers inside string literals are skipped.
    The syntax comes from `language`, or is guessed from the text when that is missing or unknown.
    A file without non-whitespace characters has density 0.
    """
    total = sum(not c.isspace() for c in source)
    if total == 0:
        return 0.0
    spans = comment_spans(source, comment_syntax(source, language))
    comment = sum(not c.isspace() for start, end in spans for c in source[start:end])
    return comment / total


# The characters that open a string literal under each syntax.
_QUOTES = {"python": "'\"", "c": "'\"`", "hash": "'\""}


def comment_spans(text: str, syntax: str) -> list[tuple[int, int]]:
    """[start, end) character ranges of the comments of `text` under `syntax`."""
    spans = []
    depth = 0  # Python bracket depth: a string inside brackets is never a docstring
    i = 0
    while i < len(text):
        char = text[i]
        if _starts_line_comment(text, i, syntax):
            end = _end_of_line(text, i)
            spans.append((i, end))
        elif syntax == "c" and text.startswith("/*", i):
            close = text.find("*/", i + 2)
            end = len(text) if close < 0 else close + 2
            spans.append((i, end))
        elif char in _QUOTES[syntax]:
            end = _string_end(text, i, syntax)
            if syntax == "python" and depth == 0 and _is_docstring(text, i, end):
                spans.append((_prefix_start(text, i), end))
        else:
            if syntax == "python":
                depth = max(0, depth + (char in "([{") - (char in ")]}"))
            end = i + 1
        i = end
    return spans


def _starts_line_comment(text: str, i: int, syntax: str) -> bool:
    if syntax == "c":
        return text.startswith("//", i)
    if text[i] != "#":
        return False
    # In shell a # inside a word ($#, ${#x}) is no comment; Python has no such case.
    return syntax == "python" or i == 0 or text[i - 1].isspace() or text[i - 1] == ";"


def _end_of_line(text: str, i: int) -> int:
    newline = text.find("\n", i)
    return len(text) if newline < 0 else newline


def _string_end(text: str, start: int, syntax: str) -> int:
    """End of the string literal opening at `start`. Triple-quoted (Python) and backtick strings
    may span lines; others stop at the end of their line, so a stray apostrophe (a Rust
    lifetime, an unquoted "don't") hides at most the rest of one line."""
    quote = text[start]
    if syntax == "python" and text.startswith(quote * 3, start):
        quote = quote * 3
    multiline = len(quote) == 3 or quote == "`"
    i = start + len(quote)
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text.startswith(quote, i):
            return i + len(quote)
        elif text[i] == "\n" and not multiline:
            return i
        else:
            i += 1
    return len(text)


def _prefix_start(text: str, quote: int) -> int:
    """Start of a Python string literal including its prefix letters (r, b, u, f)."""
    start = quote
    while start > 0 and quote - start < 2 and text[start - 1] in "rRbBuUfF":
        start -= 1
    return start


def _is_docstring(text: str, quote: int, end: int) -> bool:
    """A string literal alone on its line(s): nothing but indentation before it and at most a
    comment after it, i.e. an expression statement, which is what a docstring is."""
    start = _prefix_start(text, quote)
    line_start = text.rfind("\n", 0, start) + 1
    after = text[end : _end_of_line(text, end)].strip()
    return not text[line_start:start].strip() and (not after or after.startswith("#"))


# ----------------------------------------------------------------------------- command line


def add_commands(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `polar-triples` and `codepmp-pairs` under `jaxrm data`."""
    polar = data_commands.add_parser(
        "polar-triples",
        help="build POLAR pre-training triples from policy trajectories",
        description="Group trajectory rows {prompt, policy, response} by prompt and write, per "
        "prompt, triples {prompt, reference, chosen, rejected, chosen_policy, rejected_policy}: "
        "reference and chosen are two different samples of one policy A, rejected a sample of "
        "another policy B. Policies take the roles A and B about equally often. Every prompt "
        "needs at least two policies, one of them with at least two samples.",
    )
    polar.add_argument(
        "trajectories", nargs="+", metavar="TRAJECTORIES", help="JSONL/Parquet files or globs"
    )
    polar.add_argument("--out", required=True, metavar="FILE", help="new JSONL file to write")
    polar.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    polar.add_argument(
        "--per-prompt",
        type=int,
        default=1,
        metavar="N",
        help="triples per prompt, with different (reference, chosen) pairs while there are "
        "enough samples (default 1)",
    )
    polar.set_defaults(run=cmd_polar_triples)

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


def cmd_polar_triples(args: argparse.Namespace) -> None:
    _refuse_existing(args.out)
    source = open_source(args.trajectories)
    rows = (source.read(i) for i in range(len(source)))
    counts: Counter = Counter()
    triples = polar_triples(rows, args.seed, args.per_prompt, counts)
    write_jsonl(triples, args.out)
    as_a = Counter(t["chosen_policy"] for t in triples)
    as_b = Counter(t["rejected_policy"] for t in triples)
    prompts = len(triples) // args.per_prompt
    print(f"wrote {len(triples)} triples for {prompts} prompts to {args.out}")
    if counts["empty_responses"]:
        print(f"left out {counts['empty_responses']} empty responses")
    roles = ", ".join(f"{p} {as_a[p]}/{as_b[p]}" for p in sorted(as_a.keys() | as_b.keys()))
    print(f"policy A/B counts: {roles}")


def cmd_codepmp_pairs(args: argparse.Namespace) -> None:
    _refuse_existing(args.out)
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


def write_jsonl(rows: Iterable[Row], out: str | Path) -> None:
    """Writes `rows` to a new JSONL file at `out`, all at once or not at all.

    The rows go to a temporary file beside `out` that is renamed into place when complete, so an
    interrupted build never leaves a partial file that looks finished. An existing `out` is
    refused, not overwritten.
    """
    path = Path(out)
    _refuse_existing(path)
    # A random name, not mkstemp: its files are private (0600), the output should not be.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "x", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _refuse_existing(path)
        os.replace(temporary, path)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _refuse_existing(out: str | Path) -> None:
    if Path(out).exists():
        raise UserError(f"{out} already exists; choose a new --out file (nothing was written)")
