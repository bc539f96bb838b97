"""POLAR pre-training triples from policy trajectories (METHODS.md, section 1).

    jaxrm data polar-triples "gen/*.jsonl" --out triples.jsonl --seed 0 --per-prompt 2

Rows {prompt, policy, response} are grouped by prompt; each triple takes two different samples
of one policy A (reference, chosen) and one sample of another policy B (rejected). The builder
holds its input in memory: it groups rows across whole files. Inputs that cannot form a triple
are errors naming file and line.
"""

import argparse
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jaxrm.data.rows import check_row
from jaxrm.data.sources import open_source
from jaxrm.errors import UserError
from jaxrm.storage import refuse_existing, write_jsonl

Row = dict[str, Any]


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


# ----------------------------------------------------------------------------- command line


def add_command(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `polar-triples` under `jaxrm data`."""
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


def cmd_polar_triples(args: argparse.Namespace) -> None:
    refuse_existing(args.out)
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
