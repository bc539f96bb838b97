"""Generated pre-training data: POLAR policy pools and CodePMP strong/weak pairs, end to end.

    jaxrm data polar-pool POOL.yaml
    jaxrm data codepmp-generate CODEPMP.yaml

POOL.yaml (paths relative to the file):

    prompts: prompts.jsonl          # prompt rows, e.g. from `jaxrm data prefixes`
    out: triples.jsonl              # POLAR triples, written once everything is generated
    work_dir: pool                  # one resumable trajectory file per policy
    seed: 0
    per_prompt: 1                   # triples per prompt
    batch_size: 32
    sampling: {temperature: 1.0, top_p: 0.9, top_k: 50, max_new_tokens: 4096}
    policies:
      - {name: llama3-8b, model: /models/llama3-8b}
      - {name: qwen2-7b, model: /models/qwen2-7b, overrides: [model.dtype=float32],
         sampling: {temperature: 0.8}}

For each prompt two different policies are drawn (seeded): A samples it twice, B once, as the
POLAR rule needs (METHODS.md, section 1). Each policy then runs once over all the prompts it was
drawn for, so one model is in memory at a time. Policies sample with their own seed (from the
pool seed and the policy's name): checkpoints of one model must not share their draws. Empty
responses and the prompts they leave without a triple are dropped and counted; the rest goes
to the triple builder.

CODEPMP.yaml:

    sources: ["code/**/*.py"]       # code files (one source each) or JSONL/Parquet {source, language?}
    out: pairs.jsonl
    work_dir: codepmp
    describer: {model: /models/chat}            # writes a description of each source
    strong: {model: /models/deepseek-coder-6.7b}  # its answer to a description is chosen
    weak: {model: /models/deepseek-coder-1.3b}    # its answer is rejected
    filters: {min_comment_density: 0.01, max_source_chars: 20000}

Each model entry may set `overrides`, `tokenizer`, `sampling` and `template` (a str.format text
with {source} and {language} for the describer, {description} and {language} for the others).
Rerunning either command resumes the generation where it stopped.
"""

import argparse
import dataclasses
import gc
import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxrm.builders import (
    DROP_REASONS,
    SourceFilter,
    codepmp_pairs,
    polar_triples,
    prompt_key,
    write_jsonl,
)
from jaxrm.checkpoint import find_checkpoint
from jaxrm.errors import UserError
from jaxrm.generate import (
    POLAR_MAX_NEW_TOKENS,
    POLAR_SAMPLING,
    check_run_settings,
    generate_file,
    make_jobs,
    open_model,
    read_prompts,
)
from jaxrm.sampling import Sampling
from jaxrm.scoring import read_rows
from jaxrm.sources import FORMATS, glob_paths, read_text_file

Row = dict[str, Any]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Code generation is sampled cooler than POLAR's trajectories: descriptions and answers should be
# each model's best attempt, so the strong/weak gap reflects the models, not the sampling noise.
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


# ----------------------------------------------------------------------------- settings files


def read_settings(path: str | Path, allowed: dict[str, type], required: Sequence[str]) -> Row:
    """The YAML mapping at `path` with relative paths kept relative to it; unknown or missing
    keys and wrong types are errors naming the key."""
    path = Path(path)
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: must be a mapping of settings")
    for key, value in settings.items():
        if key not in allowed:
            raise UserError(f"{path}: unknown key '{key}' (known: {', '.join(allowed)})")
        if not isinstance(value, allowed[key]):
            raise UserError(f"{path}: '{key}' must be {_kind(allowed[key])}, got {value!r}")
    for key in required:
        if key not in settings:
            raise UserError(f"{path}: '{key}' is missing")
    return settings


def _kind(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(
        {str: "text", int: "a whole number", list: "a list", dict: "a mapping"}.get(t, t.__name__)
        for t in types
    )


def _resolve(base: Path, value: str) -> str:
    return value if "://" in value or Path(value).is_absolute() else str(base / value)


@dataclasses.dataclass
class ModelEntry:
    """One model of a pool: where it is and how to sample from it."""

    name: str
    model: str
    overrides: list[str]
    tokenizer: str | None
    sampling: Sampling
    max_new_tokens: int
    template: str | None

    @classmethod
    def parse(
        cls, entry: Any, where: str, base: Path, defaults: Row, name: str | None = None
    ) -> "ModelEntry":
        if not isinstance(entry, dict):
            raise UserError(f"{where}: must be a mapping with at least 'model'")
        known = {"name", "model", "overrides", "tokenizer", "sampling", "template"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise UserError(
                f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})"
            )
        for key in ("model",) if name else ("name", "model"):
            if not isinstance(entry.get(key), str):
                raise UserError(f"{where}.{key}: must be text")
        for key in ("tokenizer", "template"):
            if not isinstance(entry.get(key, ""), str):
                raise UserError(f"{where}.{key}: must be text")
        overrides = entry.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise UserError(f"{where}.overrides: must be a list of key=value texts")
        name = name or entry["name"]
        if not NAME.fullmatch(name):
            raise UserError(f"{where}.name: {name!r} must be letters, digits, '.', '_' or '-'")
        sampling = _sampling(entry.get("sampling", {}), f"{where}.sampling", defaults)
        tokenizer = entry.get("tokenizer")
        model = _resolve(base, entry["model"])
        try:  # a wrong path fails now, not after the models before it have run
            find_checkpoint(model)
        except UserError as e:
            raise UserError(f"{where}.model: {e}") from None
        try:
            drawn = Sampling(sampling["temperature"], sampling["top_k"], sampling["top_p"])
        except UserError as e:
            raise UserError(f"{where}.sampling.{e}") from None
        return cls(
            name=name,
            model=model,
            overrides=overrides,
            tokenizer=_resolve(base, tokenizer) if tokenizer else None,
            sampling=drawn,
            max_new_tokens=sampling["max_new_tokens"],
            template=entry.get("template"),
        )

    def settings(self) -> Row:
        """What an earlier run of this entry must have used for its output to be resumed."""
        return {
            "model": self.model,
            "overrides": self.overrides,
            **dataclasses.asdict(self.sampling),
        }


def _sampling(given: Any, where: str, defaults: Row) -> Row:
    if not isinstance(given, dict):
        raise UserError(f"{where}: must be a mapping")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(defaults)})")
    merged = {**defaults, **given}
    for key, value in merged.items():
        number = (int,) if key in ("top_k", "max_new_tokens") else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            raise UserError(f"{where}.{key}: must be a number, got {value!r}")
    if merged["max_new_tokens"] < 1:
        raise UserError(f"{where}.max_new_tokens: must be >= 1")
    return merged


def policy_seed(seed: int, name: str) -> int:
    """A policy's own sampling seed: stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def _generate(
    entry: ModelEntry,
    prompts: list[tuple[str, Any]],
    samples: Sequence[int],
    out: Path,
    seed: int,
    batch_size: int,
    label: str,
) -> dict[str, Any]:
    """`samples[i]` responses of `entry`'s model to prompt i, into `out` (resuming it)."""
    model = open_model(entry.model, entry.overrides, entry.tokenizer)
    jobs = make_jobs(prompts, model.tokenizer, samples, model.max_positions)
    sampler = model.sampler(entry.sampling, seed, batch_size)
    settings = {**entry.settings(), "seed": seed, "eos_ids": model.eos_ids, "prompts": label}
    summary = generate_file(model, sampler, jobs, out, entry.name, entry.max_new_tokens, settings)
    del sampler, model
    gc.collect()  # one model in memory at a time
    return summary


# ----------------------------------------------------------------------------- POLAR pools

POOL_KEYS = {
    "prompts": str,
    "out": str,
    "work_dir": str,
    "seed": int,
    "per_prompt": int,
    "batch_size": int,
    "sampling": dict,
    "policies": list,
}


def draw_roles(prompt_count: int, policies: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """(A, B) per prompt: two different policies drawn uniformly, seeded."""
    rng = random.Random(seed)
    return [tuple(rng.sample(list(policies), 2)) for _ in range(prompt_count)]  # type: ignore[misc]


def polar_pool(path: str | Path) -> dict[str, Any]:
    """Runs POOL.yaml: assigns roles, generates every policy's trajectories, builds triples."""
    path = Path(path)
    base = path.parent
    settings = read_settings(path, POOL_KEYS, ("prompts", "out", "work_dir", "policies"))
    out = Path(_resolve(base, settings["out"]))
    if out.exists():
        raise UserError(
            f"{out} already exists; choose a new 'out' in {path} (nothing was generated)"
        )
    defaults = {**dataclasses.asdict(POLAR_SAMPLING), "max_new_tokens": POLAR_MAX_NEW_TOKENS}
    defaults = _sampling(settings.get("sampling", {}), f"{path}: sampling", defaults)
    if len(settings["policies"]) < 2:
        raise UserError(f"{path}: 'policies' needs two or more policies")
    entries = [
        ModelEntry.parse(entry, f"{path}: policies[{i}]", base, defaults)
        for i, entry in enumerate(settings["policies"])
    ]
    names = [e.name for e in entries]
    if len(set(names)) < len(names):
        raise UserError(f"{path}: the policies' names must differ")
    seed, batch_size = settings.get("seed", 0), settings.get("batch_size", 32)
    check_run_settings(seed, batch_size, f"{path}: ")
    per_prompt = settings.get("per_prompt", 1)
    if per_prompt < 1:
        raise UserError(f"{path}: per_prompt must be >= 1, got {per_prompt}")
    prompts = read_prompts(_resolve(base, settings["prompts"]))
    roles = draw_roles(len(prompts), names, seed)
    work = Path(_resolve(base, settings["work_dir"]))
    summaries = {}
    for entry in entries:
        # per_prompt + 1 samples of A give per_prompt different (reference, chosen) pairs.
        samples = [
            per_prompt + 1 if a == entry.name else per_prompt if b == entry.name else 0
            for a, b in roles
        ]
        if any(samples):
            out_file = work / f"{entry.name}.jsonl"
            policy = policy_seed(seed, entry.name)
            label = settings["prompts"]
            summaries[entry.name] = _generate(
                entry, prompts, samples, out_file, policy, batch_size, label
            )
    rows, counts = _usable_trajectories(work, list(summaries), [p for _, p in prompts])
    triples = polar_triples(rows, seed, per_prompt)
    write_jsonl(triples, out)
    return {"triples": len(triples), "prompts": len(prompts), **counts, "generated": summaries}


def _usable_trajectories(
    work: Path, names: Sequence[str], prompts: Sequence[Any]
) -> tuple[list[tuple[str, Row]], dict[str, int]]:
    """Trajectory rows, in prompt order, of the prompts that still form a triple once empty
    responses are dropped. Repeated prompts are one prompt to the triple builder: counted."""
    order: dict[str, int] = {}
    for prompt in prompts:
        order.setdefault(prompt_key(prompt), len(order))
    groups: list[list[tuple[str, Row]]] = [[] for _ in order]
    empty = 0
    for name in names:
        for where, row in read_rows(str(work / f"{name}.jsonl")):
            if row["response"]:
                groups[order[prompt_key(row["prompt"])]].append((where, row))
            else:
                empty += 1
    usable = [group for group in groups if _forms_triple(group)]
    counts = {
        "empty_responses": empty,
        "prompts_without_triple": len(groups) - len(usable),
        "repeated_prompts": len(prompts) - len(order),
    }
    return [row for group in usable for row in group], counts


def _forms_triple(group: list[tuple[str, Row]]) -> bool:
    per_policy = Counter(row["policy"] for _, row in group)
    return len(per_policy) >= 2 and max(per_policy.values()) >= 2


def cmd_polar_pool(args: argparse.Namespace) -> None:
    print(json.dumps(polar_pool(args.pool)))


# ----------------------------------------------------------------------------- CodePMP

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
        matched = [Path(p) for p in glob_paths(_resolve(base, pattern)) if Path(p).is_file()]
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
    out = Path(_resolve(base, settings["out"]))
    if out.exists():
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
    work = Path(_resolve(base, settings["work_dir"]))

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
    _generate(
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
    write_jsonl(descriptions, _fresh(work / "descriptions.jsonl"))
    for role in ("strong", "weak"):
        template = entries[role].template or RESPOND_TEMPLATE
        asks = [
            (d["id"], _fill(template, role, description=d["prompt"], language=d["language"]))
            for d in descriptions
        ]
        _generate(
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
        write_jsonl(answers, _fresh(work / f"{role}.responses.jsonl"))
    pairs, pair_counts = codepmp_pairs(
        str(work / "descriptions.jsonl"),
        str(work / "strong.responses.jsonl"),
        str(work / "weak.responses.jsonl"),
    )  # the source filters were applied before anything was generated
    write_jsonl(pairs, out)
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
    print(json.dumps(codepmp_generate(args.config)))


def add_commands(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `polar-pool` and `codepmp-generate` under `jaxrm data`."""
    pool = data_commands.add_parser(
        "polar-pool",
        help="generate POLAR triples with a pool of policies (models)",
        description="For each prompt, draw two policies of POOL.yaml: A answers twice, B once "
        "(temperature 1.0, top-p 0.9, top-k 50 unless set); then build the triples. Resumable: "
        "rerun the same command. See the module docs for the file's keys.",
    )
    pool.add_argument("pool", metavar="POOL.yaml")
    pool.set_defaults(run=cmd_polar_pool)
    code = data_commands.add_parser(
        "codepmp-generate",
        help="generate CodePMP pairs: describe sources, answer with a strong and a weak model",
        description="A describer model writes a description of each source file; a strong and a "
        "weak code model answer each description; the strong answer is chosen, the weak one "
        "rejected, and the pair builder filters the pairs. Resumable: rerun the same command.",
    )
    code.add_argument("config", metavar="CODEPMP.yaml")
    code.set_defaults(run=cmd_codepmp_generate)
