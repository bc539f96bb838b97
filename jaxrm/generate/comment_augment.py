"""`jaxrm data comment-augment AUGMENT.yaml`: a model adds comments to code that has few.

    sources: ["code/**/*.py"]       # code files, or JSONL/Parquet rows {source, language?, id?}
    out: augmented.jsonl            # every source once: {id, language, source, augmented, ...}
    work_dir: augment               # the model's resumable answers
    below_density: 0.05             # sources with less comment than this are given to the model
    max_source_chars: 8000          # longer ones are left as they are
    seed: 0
    batch_size: 32
    commenter: {model: /models/deepseek-coder-6.7b-instruct}   # or {endpoint: {...}}

Comment augmentation (arXiv 2402.13013): code with few comments is given to a model that writes
it again with comments; a version is kept only when its code is the original's apart from
comments (`changed_code`: Python by its syntax tree, other languages token by token once
comments are cut out) and it has more comment than before. Every other source is written as
it was, and the reasons are counted. The summary gives the comment density (comment characters
over non-whitespace characters) of the sources before and after, over all of them and over
the ones given to the model.

`out` is a source file for `codepmp-generate` (its `sources:` may name it) and for
`jaxrm data codepmp-pairs`' source filters, so the CodePMP filter on comment density sees the
augmented code. The commenter entry takes what a codepmp-generate model entry takes (`model` or
`endpoint`, `overrides`, `tokenizer`, `sampling`, `template` with {source} and {language}). The
default template opens a code block for the answer; the answer's code is what comes before the
block's closing fence (or, for a template that does not open one, its first code block).
A source whose prompt does not fit a local model's context stops the run with one line naming
it (max_source_chars keeps such files out). Rerunning the command resumes the model's answers;
the run stops before writing if `out` exists. Several hosts share the work as in
`jaxrm generate`.
"""

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from jaxrm import storage
from jaxrm.data.code_text import changed_code, code_blocks, comment_density
from jaxrm.data.sources import read_rows
from jaxrm.errors import UserError
from jaxrm.generate.codepmp import CODE_SAMPLING, read_sources
from jaxrm.generate.pool_config import (
    ModelEntry,
    generate_with,
    policy_seed,
    read_settings,
    resolve_path,
)
from jaxrm.generate.trajectories import (
    add_distributed_options,
    check_run_settings,
    join_hosts,
    write_once,
)
from jaxrm.storage import write_jsonl

Row = dict[str, Any]
COMMENT_TEMPLATE = (
    "### Instruction:\nAdd comments to the following {language} code that explain what it does "
    "and why. Do not change the code itself: keep every line of it as it is, and only add "
    "comments. Reply with the whole commented file.\n\n```{language}\n{source}\n```\n\n"
    "### Response:\n```{language}\n"
)
COMMENT_SAMPLING = {**CODE_SAMPLING, "max_new_tokens": 2048}
REASONS = ("unparsable", "code_changed", "no_comment_added", "no_code")
AUGMENT_KEYS = {
    "sources": (str, list),
    "out": str,
    "work_dir": str,
    "below_density": (int, float),
    "max_source_chars": int,
    "seed": int,
    "batch_size": int,
    "commenter": dict,
}


def comment_augment(path: str | Path) -> dict[str, Any]:
    """Runs AUGMENT.yaml: asks the commenter for every source with few comments, keeps the
    answers that only add comments, writes every source to `out`."""
    path = Path(path)
    base = path.parent
    settings = read_settings(path, AUGMENT_KEYS, ("sources", "out", "work_dir", "commenter"))
    out = resolve_path(base, settings["out"])
    if storage.exists(out):
        raise UserError(
            f"{out} already exists; choose a new 'out' in {path} (nothing was generated)"
        )
    below = settings.get("below_density", 0.05)
    longest = settings.get("max_source_chars", 8000)
    if isinstance(below, bool) or not 0 < below <= 1:
        raise UserError(f"{path}: below_density must be in (0, 1], got {below!r}")
    if longest < 1:
        raise UserError(f"{path}: max_source_chars must be >= 1, got {longest}")
    entry = ModelEntry.parse(
        settings["commenter"], f"{path}: commenter", base, COMMENT_SAMPLING, name="commenter"
    )
    seed, batch_size = settings.get("seed", 0), settings.get("batch_size", 32)
    check_run_settings(seed, batch_size, f"{path}: ")
    patterns = settings["sources"]
    sources = read_sources(patterns if isinstance(patterns, list) else [patterns], base)
    asked = [
        i
        for i, s in enumerate(sources)
        if comment_density(s["source"], s["language"]) < below and 0 < len(s["source"]) <= longest
    ]
    template = entry.template or COMMENT_TEMPLATE
    prompts = [(sources[i]["id"], _fill(template, sources[i])) for i in asked]
    answers_file = Path(resolve_path(base, settings["work_dir"])) / "commenter.jsonl"
    generated = {}
    if prompts:
        generated = generate_with(
            entry,
            prompts,
            [1] * len(prompts),
            answers_file,
            policy_seed(seed, "commenter"),
            batch_size,
            "sources",
        )
        answers = [row["response"] for _, row in read_rows(str(answers_file))]
    else:
        answers = []
    rows, reasons = review(sources, asked, answers, _opens_block(template))
    before = [r["original_comment_density"] for r in rows]
    after = [r["comment_density"] for r in rows]
    write_once(lambda: write_jsonl(rows, out), str(out))
    asked_before = [before[i] for i in asked]
    asked_after = [after[i] for i in asked]
    return {
        "sources": len(sources),
        "asked": len(asked),
        "augmented": sum(r["augmented"] for r in rows),
        "rejected": {reason: reasons[reason] for reason in REASONS},
        "comment_density": {
            "all": {"before": _mean(before), "after": _mean(after)},
            "asked": {"before": _mean(asked_before), "after": _mean(asked_after)},
        },
        "generated": generated,
    }


def review(
    sources: list[Row], asked: list[int], answers: list[str], opened: bool
) -> tuple[list[Row], Counter[str]]:
    """Every source as it goes to `out`: the commenter's version of source `asked[k]` (from
    `answers[k]`) where it only adds comments, else the original with the reason; and the
    reasons counted. `opened`: the prompt opened the code block the answers continue."""
    rows = []
    for source in sources:
        density = comment_density(source["source"], source["language"])
        rows.append({**source, "augmented": False, "original_comment_density": density})
    reasons: Counter[str] = Counter()
    for i, answer in zip(asked, answers, strict=True):
        source, code = sources[i], _answer_code(answer, opened)
        reason = (
            changed_code(source["source"], code, source["language"]) if code.strip() else "no_code"
        )
        if (
            reason is None
            and comment_density(code, source["language"]) <= rows[i]["original_comment_density"]
        ):
            reason = "no_comment_added"
        if reason is None:
            rows[i] |= {"source": code, "augmented": True}
        else:
            reasons[reason] += 1
            rows[i]["rejected"] = reason
    for row in rows:
        row["comment_density"] = comment_density(row["source"], row["language"])
    return rows, reasons


def _fill(template: str, source: Row) -> str:
    try:
        return template.format(source=source["source"], language=source["language"])
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"commenter.template: {e!r} is not one of {{source, language}}") from None


def _opens_block(template: str) -> bool:
    """Whether the prompt ends inside a code block it opened (an odd number of fence lines), so
    the answer starts with code."""
    fences = sum(line.strip().startswith("```") for line in template.split("\n"))
    return fences % 2 == 1


def _answer_code(answer: str, opened: bool) -> str:
    """The code of an answer: up to the closing fence of the block the prompt opened, or the
    answer's first code block (the whole answer if it has none)."""
    if opened:
        lines = answer.split("\n")
        for number, line in enumerate(lines):
            if line.strip().startswith("```") and not line.strip().strip("`"):
                return "\n".join(lines[:number]) + "\n"
        return answer
    blocks = code_blocks(answer)
    return blocks[0] + "\n" if blocks else answer


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def cmd_comment_augment(args: argparse.Namespace) -> None:
    join_hosts(args)
    print(json.dumps(comment_augment(args.config)))


def add_command(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `comment-augment` under `jaxrm data`."""
    augment = data_commands.add_parser(
        "comment-augment",
        help="have a model add comments to code with few, keeping only versions whose code is unchanged",
        description="Comment augmentation (arXiv 2402.13013) of code sources for CodePMP: a "
        "model writes each source with less comment than below_density again with comments; "
        "a version is kept only if its code is the original's apart from comments. Resumable: "
        "rerun the same command. See the module docs for the file's keys.",
    )
    augment.add_argument("config", metavar="AUGMENT.yaml")
    add_distributed_options(augment)
    augment.set_defaults(run=cmd_comment_augment)
