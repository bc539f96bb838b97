"""POLAR prompts: random initial segments of pre-training documents (METHODS.md, section 1).

    jaxrm data prefixes --corpus "corpus/*.jsonl" --out prompts.jsonl --tokenizer model_dir

A `.txt` file is one document; a JSONL or Parquet file holds one document per row, in its text
field. Each document of N tokens gives a prefix of L tokens, L drawn uniformly from
[min, min(max, N - 1)] so that something is left to continue. The prompt is the original text
up to the end of token L, sliced by the tokenizer's character offsets: decoding ids would
normalise whitespace. L is drawn only among the lengths whose end falls between two characters
(a byte-fallback token can end inside one). A document without such a length is skipped and
counted, never silently dropped. Each document draws from its own generator, seeded by
(seed, document index), so its prefixes depend on nothing else.
"""

import argparse
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxrm.data.rows import BadRow
from jaxrm.data.sources import FORMATS, Source, open_source
from jaxrm.data.tokenizer import Tokenizer, load_tokenizer
from jaxrm.errors import UserError
from jaxrm.storage import glob_paths, read_text_file, write_jsonl

Row = dict[str, Any]


class Corpus:
    """The documents of `.txt` files (one each) and of JSONL / Parquet rows (one per row), in
    the order given, as `(where, text)`; `where` is the path, or "file:line" for a row."""

    def __init__(self, patterns: Sequence[str], text_field: str = "text"):
        self.text_field = text_field
        self.files = [path for pattern in patterns for path in _matches(pattern)]
        self.sources: dict[str, Source] = {
            path: open_source(path) for path in self.files if not path.endswith(".txt")
        }

    def __len__(self) -> int:
        return sum(len(self.sources[path]) if path in self.sources else 1 for path in self.files)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for path in self.files:
            if path not in self.sources:
                yield path, read_text_file(path)
                continue
            source = self.sources[path]
            for index in range(len(source)):
                where, row = source.read(index)
                yield where, self._text(row, where)

    def _text(self, row: Any, where: str) -> str:
        if not isinstance(row, dict):
            raise BadRow(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        text = row.get(self.text_field)
        if text is None:
            raise BadRow(
                f"{where}: field '{self.text_field}' is missing (the document text; see "
                "--text-field)"
            )
        if not isinstance(text, str):
            raise BadRow(
                f"{where}: field '{self.text_field}' must be a string, got {type(text).__name__}"
            )
        return text


def _matches(pattern: str) -> list[str]:
    found = glob_paths(pattern)
    if not found:
        raise UserError(f"--corpus: no files match {pattern}")
    for path in found:
        if Path(path).is_dir():
            raise UserError(f"--corpus: {path} is a directory; name its files or a glob")
        if Path(path).suffix not in {".txt", *FORMATS}:
            raise UserError(
                f"--corpus: {path}: unknown format (use .txt, .jsonl, .parquet or .array_record)"
            )
    return found


@dataclass
class PrefixCounts:
    """What `draw_prefixes` has done so far."""

    documents: int = 0
    prefixes: int = 0
    prefix_tokens: int = 0
    too_short: int = 0  # fewer than min + 1 tokens
    no_boundary: int = 0  # every length in range ends inside a character or covers no text
    fewer_lengths: int = 0  # fewer possible lengths than --per-document; all of them written

    def summary(self, out: str | Path) -> str:
        mean = self.prefix_tokens / self.prefixes if self.prefixes else 0.0
        line = (
            f"wrote {self.prefixes} prefixes (mean {mean:.1f} tokens) from {self.documents} "
            f"documents to {out}; skipped {self.too_short} documents as too short"
        )
        if self.no_boundary:
            line += f" and {self.no_boundary} with no length in range ending between characters"
        if self.fewer_lengths:
            line += f"; {self.fewer_lengths} documents had fewer lengths than --per-document"
        return line


def draw_prefixes(
    documents: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    *,
    min_tokens: int = 1,
    max_tokens: int = 1024,
    per_document: int = 1,
    seed: int = 0,
    counts: PrefixCounts | None = None,
) -> Iterator[Row]:
    """Rows `{prompt, document, prefix_tokens}` for `(where, text)` documents, drawn lazily.

    Each document gives `per_document` prefixes of different lengths (all of its possible
    lengths when it has fewer); `counts`, when given, is updated as rows are drawn. The length
    bounds are checked at once, before anything is read.
    """
    check_lengths(min_tokens, max_tokens, per_document)
    counts = counts if counts is not None else PrefixCounts()
    return _draw(documents, tokenizer, min_tokens, max_tokens, per_document, seed, counts)


def check_lengths(min_tokens: int, max_tokens: int, per_document: int) -> None:
    if min_tokens < 1:
        raise UserError(f"--min-tokens must be at least 1, got {min_tokens}")
    if max_tokens < min_tokens:
        raise UserError(f"--max-tokens ({max_tokens}) is smaller than --min-tokens ({min_tokens})")
    if per_document < 1:
        raise UserError(f"--per-document must be at least 1, got {per_document}")


def _draw(
    documents: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    min_tokens: int,
    max_tokens: int,
    per_document: int,
    seed: int,
    counts: PrefixCounts,
) -> Iterator[Row]:
    for index, (where, text) in enumerate(documents):
        counts.documents += 1
        offsets = tokenizer.token_offsets(text)
        if len(offsets) < min_tokens + 1:
            counts.too_short += 1
            continue
        ends = prefix_ends(offsets, min_tokens, min(max_tokens, len(offsets) - 1))
        if not ends:
            counts.no_boundary += 1
            continue
        # A string seed is hashed with SHA-512: stable across runs and Python processes.
        rng = random.Random(f"{seed}:{index}")
        lengths = sorted(rng.sample(list(ends), min(per_document, len(ends))))
        if len(lengths) < per_document:
            counts.fewer_lengths += 1
        for length in lengths:
            counts.prefixes += 1
            counts.prefix_tokens += length
            yield {"prompt": text[: ends[length]], "document": where, "prefix_tokens": length}


def prefix_ends(offsets: Sequence[tuple[int, int]], low: int, high: int) -> dict[int, int]:
    """{L: character end} for each L in [low, high] at which the text splits cleanly in two.

    `offsets` are the tokens' (start, end) characters. Token L must cover some text, none of
    the first L tokens may end beyond it, and none of the later ones start before its end. That
    rules out cuts inside a character (its byte tokens leave empty or share its span) and after
    a SentencePiece word-start marker that covers no text.
    """
    later_start = {}
    smallest = min((start for start, _ in offsets[high:]), default=math.inf)
    for length in range(high, low - 1, -1):
        later_start[length] = smallest
        smallest = min(smallest, offsets[length - 1][0])
    ends = {}
    furthest = max((end for _, end in offsets[: low - 1]), default=0)
    for length in range(low, high + 1):
        start, end = offsets[length - 1]
        furthest = max(furthest, end)
        if start < end and furthest == end and end <= later_start[length]:
            ends[length] = end
    return ends


# ----------------------------------------------------------------------------- command line


def add_command(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `prefixes` under `jaxrm data`."""
    prefixes = data_commands.add_parser(
        "prefixes",
        help="draw POLAR prompts: random initial segments of pre-training documents",
        description="Write one row {prompt, document, prefix_tokens} per drawn prefix: the "
        "first L tokens of a document, L uniform in [--min-tokens, min(--max-tokens, N - 1)] "
        "for a document of N tokens, as an exact slice of its original text. A .txt file is "
        "one document; a JSONL or Parquet file one per row. Documents too short to leave a "
        "token to continue are skipped and counted. The same seed and corpus give the same "
        "file.",
    )
    prefixes.add_argument(
        "--corpus", required=True, nargs="+", metavar="FILES", help=".txt/JSONL/Parquet or globs"
    )
    prefixes.add_argument("--out", required=True, metavar="FILE", help="new JSONL file to write")
    prefixes.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="tokenizer.json, a SentencePiece .model, or a directory holding one",
    )
    prefixes.add_argument(
        "--min-tokens", type=int, default=1, metavar="N", help="shortest prefix (default 1)"
    )
    prefixes.add_argument(
        "--max-tokens", type=int, default=1024, metavar="N", help="longest prefix (default 1024)"
    )
    prefixes.add_argument(
        "--per-document",
        type=int,
        default=1,
        metavar="N",
        help="prefixes per document, of different lengths; fewer where a document has fewer "
        "possible lengths (default 1)",
    )
    prefixes.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    prefixes.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="field of a JSONL/Parquet row that holds the document (default text)",
    )
    prefixes.set_defaults(run=cmd_prefixes)


def cmd_prefixes(args: argparse.Namespace) -> None:
    check_lengths(args.min_tokens, args.max_tokens, args.per_document)
    tokenizer = load_tokenizer(args.tokenizer)
    corpus = Corpus(args.corpus, args.text_field)
    documents = tqdm(corpus, total=len(corpus), desc="prefixes", unit=" docs", dynamic_ncols=True)
    counts = PrefixCounts()
    rows = draw_prefixes(
        documents,
        tokenizer,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        per_document=args.per_document,
        seed=args.seed,
        counts=counts,
    )
    write_jsonl(rows, args.out)
    print(counts.summary(args.out))
