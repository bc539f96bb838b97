"""POLAR pre-training data from a pool of policies, end to end.

    jaxrm data polar-pool POOL.yaml

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
      - {name: internlm2-20b, endpoint: {url: "http://10.0.0.5:8000/v1", engine: vllm,
                                         concurrency: 32}}

A policy is a local model (`model`: loaded here, one at a time) or an OpenAI-compatible endpoint
(`endpoint`: vLLM, SGLang, lmdeploy or `jaxrm serve-lm`; keys and guarantees in
jaxrm/generate/endpoint.py), sampled with the same settings and per-sample seeds.

For each prompt two different policies are drawn (seeded): A samples it twice, B once, as the
POLAR rule needs (METHODS.md, section 1). Each policy then runs once over all the prompts it was
drawn for, so one model is in memory at a time. Policies sample with their own seed (from the
pool seed and the policy's name): checkpoints of one model must not share their draws. Empty
responses and the prompts they leave without a triple are dropped and counted; the rest goes
to the triple builder.

Rerunning the command resumes the generation where it stopped.
"""

import argparse
import dataclasses
import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxrm import storage
from jaxrm.data.polar_triples import polar_triples, prompt_key
from jaxrm.data.sources import read_rows
from jaxrm.errors import UserError
from jaxrm.generate.pool_config import (
    ModelEntry,
    generate_with,
    policy_seed,
    read_settings,
    resolve_path,
    sampling_settings,
)
from jaxrm.generate.trajectories import (
    POLAR_MAX_NEW_TOKENS,
    POLAR_SAMPLING,
    add_distributed_options,
    check_run_settings,
    join_hosts,
    read_prompts,
    write_once,
)
from jaxrm.storage import write_jsonl

Row = dict[str, Any]

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
    out = resolve_path(base, settings["out"])  # local, or a URL: write_jsonl uploads it
    if storage.exists(out):
        raise UserError(
            f"{out} already exists; choose a new 'out' in {path} (nothing was generated)"
        )
    defaults = {**dataclasses.asdict(POLAR_SAMPLING), "max_new_tokens": POLAR_MAX_NEW_TOKENS}
    defaults = sampling_settings(settings.get("sampling", {}), f"{path}: sampling", defaults)
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
    prompts = read_prompts(resolve_path(base, settings["prompts"]))
    roles = draw_roles(len(prompts), names, seed)
    work = Path(resolve_path(base, settings["work_dir"]))
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
            summaries[entry.name] = generate_with(
                entry, prompts, samples, out_file, policy, batch_size, label
            )
    rows, counts = _usable_trajectories(work, list(summaries), [p for _, p in prompts])
    triples = polar_triples(rows, seed, per_prompt)
    write_once(lambda: write_jsonl(triples, out), str(out))
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
    join_hosts(args)
    print(json.dumps(polar_pool(args.pool)))


def add_command(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `polar-pool` under `jaxrm data`."""
    pool = data_commands.add_parser(
        "polar-pool",
        help="generate POLAR triples with a pool of policies (models)",
        description="For each prompt, draw two policies of POOL.yaml: A answers twice, B once "
        "(temperature 1.0, top-p 0.9, top-k 50 unless set); then build the triples. Resumable: "
        "rerun the same command. See the module docs for the file's keys.",
    )
    pool.add_argument("pool", metavar="POOL.yaml")
    add_distributed_options(pool)
    pool.set_defaults(run=cmd_polar_pool)
