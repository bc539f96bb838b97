"""Generated CodePMP pairs, end to end: describe sources, answer strong and weak, build pairs.

    jaxrm data codepmp-generate CODEPMP.yaml

CODEPMP.yaml (paths relative to the file):

    sources: ["code/**/*.py"]       # code files (one source each) or JSONL/Parquet {source, language?}
    out: pairs.jsonl
    work_dir: codepmp
    describer: {model: /models/chat}            # writes a description of each source
    strong: {model: /models/deepseek-coder-6.7b}  # its answer to a description is chosen
    weak: {model: /models/deepseek-coder-1.3b}    # its answer is rejected
    filters: {min_comment_density: 0.01, max_source_chars: 20000}

Each model entry may set `overrides`, `tokenizer`, `sampling` and `template` (a str.format text
with {source} and {language} for the describer, {description} and {language} for the others).
Rerunning the command resumes the generation where it stopped.
"""

import argparse
import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxrm import storage
from jaxrm.data.codepmp_pairs import DROP_REASONS, SourceFilter, codepmp_pairs
from jaxrm.data.sources import FORMATS, read_rows
from jaxrm.errors import UserError
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
from jaxrm.storage import glob_paths, read_text_file, write_jsonl

Row = dict[str, Any]
CODE_SAMPLING = {"temperature": 0.2, "top_p": 0.95, "top_k": 0, "max_new_tokens": 1024}
DESCRIBE_TEMPLATE = (
    "### Instruction:\nWrite a short description of what the following {language} code does, "
    "detailed enough that a programmer could write it again from the description alone.\n\n"
    "```{language}\n{source}\n```\n\n### Response:\n"
)
RESPOND_TEMPLATE = "### Instruction:\n{description}\n\n### Response:\n"
EXTENSION_LANGUAGES = {
    ".py": "python",
    ".js": "javascript",
    ".ts": "typescript",
    ".java": "java",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".cs": "csharp",
    ".go": "go",
    ".rs": "rust",
    ".rb": "ruby",
    ".php": "php",
    ".sh": "bash",
    ".kt": "kotlin",
    ".swift": "swift",
    ".scala": "scala",
}


CODEPMP_KEYS = {
    "sources": (str, list),
    "out": str,
    "work_dir": str,
    "seed": int,
    "batch_size": int,
    "describer": dict,
    "strong": dict,
    "weak": dict,
    "filters": dict,
}


def read_sources(patterns: Sequence[str], base: Path) -> list[Row]:
    """{id, source, language} per code file, or per row {source, language?, id?} of a
    JSONL/Parquet file; ids are the file path or "file:line"."""
    sources = []
    for pattern in patterns:
        matched = [Path(p) for p in glob_paths(resolve_path(base, pattern)) if Path(p).is_file()]
        if not matched:
            raise UserError(f"sources: {pattern} matches no file")
        for file in matched:
            if file.suffix in FORMATS:
                sources += [_source_row(where, row) for where, row in read_rows(str(file))]
                continue
            sources.append(
                {
                    "id": str(file),
                    "source": read_text_file(file),
                    "language": EXTENSION_LANGUAGES.get(
                        file.suffix, file.suffix.lstrip(".") or "text"
                    ),
                }
            )
    return sources


def _source_row(where: str, row: Any) -> Row:
    if not isinstance(row, dict) or not isinstance(row.get("source"), str):
        raise UserError(f"{where}: a source row needs a text field 'source'")
    language = row.get("language") or "text"
    return {"id": str(row.get("id", where)), "source": row["source"], "language": str(language)}


def _source_filter(given: Any, where: str) -> SourceFilter:
    if not isinstance(given, dict):
        raise UserError(f"{where}: must be a mapping")
    fields = [f.name for f in dataclasses.fields(SourceFilter)]
    for key, value in given.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(fields)})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}.{key}: must be a number, got {value!r}")
    bounds = SourceFilter(**given)
    try:
        bounds.check(name=lambda field: field)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return bounds


def codepmp_generate(path: str | Path) -> dict[str, Any]:
    """Runs CODEPMP.yaml: describe each source, answer each description with the strong and the
    weak model, then build the pairs."""
    path = Path(path)
    base = path.parent
    settings = read_settings(
        path, CODEPMP_KEYS, ("sources", "out", "work_dir", "describer", "strong", "weak")
    )
    out = resolve_path(base, settings["out"])  # local, or a URL: write_jsonl uploads it
    if storage.exists(out):
        raise UserError(
            f"{out} already exists; choose a new 'out' in {path} (nothing was generated)"
        )
    bounds = _source_filter(settings.get("filters", {}), f"{path}: filters")
    entries = {
        role: ModelEntry.parse(settings[role], f"{path}: {role}", base, CODE_SAMPLING, name=role)
        for role in ("describer", "strong", "weak")
    }
    seed, batch_size = settings.get("seed", 0), settings.get("batch_size", 32)
    check_run_settings(seed, batch_size, f"{path}: ")
    patterns = (
        settings["sources"] if isinstance(settings["sources"], list) else [settings["sources"]]
    )
    work = Path(resolve_path(base, settings["work_dir"]))

    sources = read_sources(patterns, base)
    repeated = [i for i, n in Counter(s["id"] for s in sources).items() if n > 1]
    if repeated:
        raise UserError(f"sources: id {repeated[0]!r} appears more than once (overlapping globs?)")
    counts = Counter(sources=len(sources))
    kept = []
    for source in sources:
        reason = bounds.reject_reason(source["source"], source["language"])
        if reason:
            counts[f"source_{reason}"] += 1
        else:
            kept.append(source)
    describe = entries["describer"].template or DESCRIBE_TEMPLATE
    prompts = [
        (s["id"], _fill(describe, "describer", source=s["source"], language=s["language"]))
        for s in kept
    ]
    generate_with(
        entries["describer"],
        prompts,
        [1] * len(prompts),
        work / "describer.jsonl",
        policy_seed(seed, "describer"),
        batch_size,
        "sources",
    )
    descriptions = []
    for source, (_, row) in zip(kept, read_rows(str(work / "describer.jsonl")), strict=True):
        description = row["response"].strip()
        counts["empty_description"] += not description
        if description:
            descriptions.append({**source, "prompt": description})
    write_once(
        lambda: write_jsonl(descriptions, _fresh(work / "descriptions.jsonl")), "descriptions"
    )
    for role in ("strong", "weak"):
        template = entries[role].template or RESPOND_TEMPLATE
        asks = [
            (d["id"], _fill(template, role, description=d["prompt"], language=d["language"]))
            for d in descriptions
        ]
        generate_with(
            entries[role],
            asks,
            [1] * len(asks),
            work / f"{role}.jsonl",
            policy_seed(seed, role),
            batch_size,
            "descriptions",
        )
        answers = [
            {"id": d["id"], "response": row["response"]}
            for d, (_, row) in zip(
                descriptions, read_rows(str(work / f"{role}.jsonl")), strict=True
            )
        ]
        responses = work / f"{role}.responses.jsonl"
        write_once(lambda: write_jsonl(answers, _fresh(responses)), str(responses))  # noqa: B023
    pairs, pair_counts = codepmp_pairs(
        str(work / "descriptions.jsonl"),
        str(work / "strong.responses.jsonl"),
        str(work / "weak.responses.jsonl"),
    )  # the source filters were applied before anything was generated
    write_once(lambda: write_jsonl(pairs, out), str(out))
    return {"pairs": len(pairs), **counts, **{k: pair_counts[k] for k in DROP_REASONS}}


def _fill(template: str, role: str, **values: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"{role}.template: {e!r} is not one of {{{', '.join(values)}}}") from None


def _fresh(path: Path) -> Path:
    """`path` cleared for rewriting: these files are derived again on every run."""
    path.unlink(missing_ok=True)
    return path


def cmd_codepmp_generate(args: argparse.Namespace) -> None:
    join_hosts(args)
    print(json.dumps(codepmp_generate(args.config)))


def add_command(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `codepmp-generate` under `jaxrm data`."""
    code = data_commands.add_parser(
        "codepmp-generate",
        help="generate CodePMP pairs: describe sources, answer with a strong and a weak model",
        description="A describer model writes a description of each source file; a strong and a "
        "weak code model answer each description; the strong answer is chosen, the weak one "
        "rejected, and the pair builder filters the pairs. Resumable: rerun the same command.",
    )
    code.add_argument("config", metavar="CODEPMP.yaml")
    add_distributed_options(code)
    code.set_defaults(run=cmd_codepmp_generate)
