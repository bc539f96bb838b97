"""Preference accuracy and Best-of-N of a reward model on the user's rows.

    jaxrm eval CHECKPOINT --data prefs.jsonl [--by category]
    jaxrm best-of-n CHECKPOINT --data candidates.jsonl

`eval` reads preference rows (chosen / rejected, or "ranked" best first; POLAR rows carry their
reference), builds each response's sequence exactly as training does, and reports as JSON:
accuracy (the best response must score strictly above every other: ties count as wrong), the
rewards' mean / std / min / max, the mean margin (best minus second-ranked), for ranked lists the
share of correctly ordered pairs, per-group accuracy with `--by FIELD` (rows without the field
form the group "(none)"), and, when rows carry
`subset`, RewardBench's scores: per subset, per section (Chat, Chat Hard, Safety, Reasoning;
subsets weighted by RewardBench's example counts, prm-math upweighted as there) and their mean.
Subsets RewardBench does not name form a section "Other", weighted by their own counts.

For a regression model (`objective: regression`) `eval` reads rows {prompt, response, score} and
reports the mean squared error of the rewards, their Pearson and Spearman correlations with the
scores (ties get their mean rank), and as accuracy the share of row pairs with different scores
whose rewards are ordered as the scores are; with `--by FIELD`, the same per group. A
multi-attribute head (`model.attributes`) is judged per attribute on the rows that rate it
(`attributes`: mse, pearson, spearman, accuracy each); beside them `mse` over every rated entry and
pearson, spearman and accuracy averaged over the attributes.

For a process reward model (`objective: prm`) `eval` reads rows {prompt, steps, labels} and
reports the share of steps judged right (reward > 0 where the label is >= 0.5) and, as
ProcessBench does, the share of wrong solutions whose first wrong step (the first judged wrong)
is found exactly, the share of right solutions judged right at every step, and their harmonic
mean, `first_error_f1`; with `--by FIELD`, the same per group.

`best-of-n` reads rows {prompt, reference?, candidates[], correct[], answers[]?} and reports, for
N = 1, 2, 4, ... up to the candidates every row has, how often the top-scored of N candidates is
correct. N candidates are a uniformly random subset; the expectation over subsets is computed
exactly (a candidate ranked i-th of M is the top of a random N-subset with probability
C(M-1-i, N-1) / C(M, N); tied rewards share their probability). Beside it: the random baseline
(the share of correct candidates), the oracle (some candidate of the N is correct) and majority
vote over `answers` (else over the candidate texts), estimated from `--samples` random subsets
per row, its ties split evenly.
"""

import argparse
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxrm.data.rows import BadRow, check_row
from jaxrm.data.sources import read_rows
from jaxrm.data.templates import flatten
from jaxrm.errors import UserError
from jaxrm.scoring.scorer import Scorer, add_scorer_options, open_scorer

# RewardBench (allenai/reward-bench, rewardbench/constants.py): sections and the example count
# each subset is weighted by.
REWARDBENCH_SECTIONS = {
    "Chat": [
        "alpacaeval-easy",
        "alpacaeval-length",
        "alpacaeval-hard",
        "mt-bench-easy",
        "mt-bench-med",
    ],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
REWARDBENCH_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,  # 447 rows, upweighted to equal the code subsets
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    **{f"hep-{language}": 164 for language in ("cpp", "go", "java", "js", "python", "rust")},
}


# --- preference accuracy -------------------------------------------------------------------------


def preference_report(
    rows: Sequence[dict], rewards: Sequence[np.ndarray], by: str | None = None
) -> dict[str, Any]:
    """The report of rows whose responses (best first) got `rewards[i]`."""
    correct = np.array([bool(r[0] > r[1:].max()) for r in rewards])
    ties = np.array([bool(r[0] == r[1:].max()) for r in rewards])
    margins = np.array([float(r[0] - r[1]) for r in rewards])
    every = np.concatenate(list(rewards))
    report: dict[str, Any] = {
        "examples": len(rows),
        "accuracy": float(correct.mean()),
        "ties": int(ties.sum()),
        "margin": float(margins.mean()),
        "reward": {
            "mean": float(every.mean()),
            "std": float(every.std()),
            "min": float(every.min()),
            "max": float(every.max()),
        },
        "best_reward_mean": float(np.mean([r[0] for r in rewards])),
        "others_reward_mean": float(np.concatenate([r[1:] for r in rewards]).mean()),
    }
    if any(len(r) > 2 for r in rewards):
        pairs = [
            (r[i] > r[j]) for r in rewards for i in range(len(r)) for j in range(i + 1, len(r))
        ]
        report["pair_accuracy"] = float(np.mean(pairs))
    if by is not None:
        report["by"] = {by: _grouped(rows, by, correct, margins)}
    if any("subset" in row for row in rows):
        subsets = _grouped(rows, "subset", correct, margins)
        report["subsets"] = subsets
        report.update(rewardbench_scores({k: v["accuracy"] for k, v in subsets.items()}, subsets))
    return report


def _grouped(
    rows: Sequence[dict], field: str, correct: np.ndarray, margins: np.ndarray
) -> dict[str, dict[str, float]]:
    keys = np.array([str(row.get(field, "(none)")) for row in rows])
    return {
        key: {
            "examples": int((keys == key).sum()),
            "accuracy": float(correct[keys == key].mean()),
            "margin": float(margins[keys == key].mean()),
        }
        for key in sorted(set(keys))
    }


def rewardbench_scores(
    accuracy: dict[str, float], subsets: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """{"sections": {name: weighted accuracy}, "score": their mean}."""
    known = {s for members in REWARDBENCH_SECTIONS.values() for s in members}
    sections = {
        name: [s for s in members if s in accuracy]
        for name, members in REWARDBENCH_SECTIONS.items()
    }
    sections["Other"] = sorted(s for s in accuracy if s not in known)
    weight = lambda s: REWARDBENCH_COUNTS.get(s, subsets[s]["examples"])  # noqa: E731
    scores = {
        name: sum(accuracy[s] * weight(s) for s in members) / sum(weight(s) for s in members)
        for name, members in sections.items()
        if members
    }
    return {"sections": scores, "score": float(np.mean(list(scores.values())))}


def evaluate_file(scorer: Scorer, data: str, by: str | None = None) -> dict[str, Any]:
    if scorer.objective == "prm":
        return {**process_report(scorer, data, by), "scoring": scorer.counts.summary()}

    attributes = scorer.attributes if scorer.objective == "regression" else []

    def sequences(row: Any, where: str) -> tuple[dict, list[np.ndarray]]:
        row = check_row(row, scorer.objective, where, attributes)
        return row, scorer.template(row).sequences

    rows, every, counts = read_rows_as_sequences(data, sequences)
    if by is not None and not any(by in row for row in rows):
        raise UserError(f"--by {by}: no row of {data} has a field '{by}'")
    if attributes:
        with tqdm(desc="scoring", total=len(every), unit="seq", dynamic_ncols=True) as bar:
            scores = scorer.scores(every, bar)
        report = attribute_report(rows, scores, attributes, scorer.reward_of(scores), by)
        return {**report, "scoring": scorer.counts.summary()}
    rewards = rewards_per_row(scorer, every, counts)
    if scorer.objective == "regression":
        report = regression_report(rows, np.concatenate(rewards), by)
    else:
        report = preference_report(rows, rewards, by)
    return {**report, "scoring": scorer.counts.summary()}


def regression_report(rows: Sequence[dict], rewards: np.ndarray, by: str | None) -> dict[str, Any]:
    """How well `rewards` (one per row) fit the rows' scores, overall and per `by` group."""
    scores = np.array([float(row["score"]) for row in rows])
    report = _fit(rewards, scores)
    report["reward"] = {"mean": float(rewards.mean()), "std": float(rewards.std())}
    if by is not None:
        keys = np.array([str(row.get(by, "(none)")) for row in rows])
        report["by"] = {
            by: {k: _fit(rewards[keys == k], scores[keys == k]) for k in sorted(set(keys))}
        }
    return report


def attribute_report(
    rows: Sequence[dict],
    scores: np.ndarray,
    attributes: Sequence[str],
    rewards: np.ndarray,
    by: str | None,
) -> dict[str, Any]:
    """How well a multi-attribute head's `scores` [rows, attributes] fit the rows' scores
    (checked: a list per row, None where not rated): per attribute over its rated rows, then
    the squared error over every rated entry and the other fits averaged over attributes;
    `rewards` are the weighted sums the model ranks by."""
    targets = np.array(
        [[np.nan if v is None else v for v in row["score"]] for row in rows], np.float64
    ).reshape(len(rows), len(attributes))
    report = _attribute_fits(scores, targets, attributes)
    report["reward"] = {"mean": float(rewards.mean()), "std": float(rewards.std())}
    if by is not None:
        keys = np.array([str(row.get(by, "(none)")) for row in rows])
        report["by"] = {
            by: {
                k: _attribute_fits(scores[keys == k], targets[keys == k], attributes)
                for k in sorted(set(keys))
            }
        }
    return report


def _attribute_fits(
    scores: np.ndarray, targets: np.ndarray, attributes: Sequence[str]
) -> dict[str, Any]:
    rated = ~np.isnan(targets)
    fits = {
        name: _fit(scores[rated[:, k], k], targets[rated[:, k], k]) if rated[:, k].any() else None
        for k, name in enumerate(attributes)
    }

    def mean(key: str) -> float | None:
        values = [f[key] for f in fits.values() if f is not None and f[key] is not None]
        return float(np.mean(values)) if values else None

    squared = (scores - np.where(rated, targets, 0.0)) ** 2
    return {
        "examples": len(scores),
        "ratings": int(rated.sum()),
        "mse": float(squared[rated].mean()) if rated.any() else None,
        "pearson": mean("pearson"),
        "spearman": mean("spearman"),
        "accuracy": mean("accuracy"),
        "attributes": fits,
    }


def process_report(scorer: Scorer, data: str, by: str | None) -> dict[str, Any]:
    """How well a process reward model judges the steps of the rows of `data`."""
    rows = [check_row(row, "prm", where) for where, row in read_rows(data)]
    if not rows:
        raise UserError(f"{data}: no rows to evaluate")
    if by is not None and not any(by in row for row in rows):
        raise UserError(f"--by {by}: no row of {data} has a field '{by}'")
    solutions = [scorer.process_sequence(row) for row in rows]
    with tqdm(desc="scoring", total=len(rows), unit="seq", dynamic_ncols=True) as bar:
        rewards = scorer.step_rewards(solutions, bar)
    labels = [
        np.asarray(row["labels"][: len(r)], float) >= 0.5
        for row, r in zip(rows, rewards, strict=True)
    ]
    report = _judged(rewards, labels)
    every = np.concatenate(rewards)
    report["reward"] = {"mean": float(every.mean()), "std": float(every.std())}
    report["steps_left_out"] = sum(len(row["labels"]) for row in rows) - len(every)
    if by is not None:
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(str(row.get(by, "(none)")), []).append(i)
        report["by"] = {
            by: {
                key: _judged([rewards[i] for i in members], [labels[i] for i in members])
                for key, members in sorted(groups.items())
            }
        }
    return report


def _judged(rewards: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, Any]:
    """Step accuracy and ProcessBench's first-error scores of solutions' step rewards."""
    first = lambda wrong: int(np.argmax(wrong)) if wrong.any() else -1  # noqa: E731
    found = kept = wrong_solutions = 0
    for reward, label in zip(rewards, labels, strict=True):
        labelled, judged = first(~label), first(reward <= 0)
        if labelled >= 0:
            wrong_solutions += 1
            found += judged == labelled
        else:
            kept += judged == -1
    right_solutions = len(rewards) - wrong_solutions
    found_share = found / wrong_solutions if wrong_solutions else None
    kept_share = kept / right_solutions if right_solutions else None
    f1 = None
    if found_share is not None and kept_share is not None and found_share + kept_share:
        f1 = 2 * found_share * kept_share / (found_share + kept_share)
    steps = sum(len(label) for label in labels)
    right_steps = sum(
        int(((r > 0) == label).sum()) for r, label in zip(rewards, labels, strict=True)
    )
    return {
        "examples": len(rewards),
        "steps": steps,
        "step_accuracy": right_steps / steps,
        "first_error_accuracy": found_share,
        "right_solution_accuracy": kept_share,
        "first_error_f1": f1,
    }


def _fit(rewards: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    return {
        "examples": len(scores),
        "mse": float(np.mean((rewards - scores) ** 2)),
        "pearson": _correlation(rewards, scores),
        "spearman": _correlation(_ranks(rewards), _ranks(scores)),
        "accuracy": _ordered_pairs(rewards, scores),
    }


def _correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None where either side is constant."""
    x, y = x - x.mean(), y - y.mean()
    scale = math.sqrt(float((x**2).sum() * (y**2).sum()))
    return float((x * y).sum() / scale) if scale > 0 else None


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _ordered_pairs(rewards: np.ndarray, scores: np.ndarray, chunk: int = 1024) -> float | None:
    """The share of pairs with different scores whose rewards are in the scores' order."""
    right = pairs = 0
    for start in range(0, len(scores), chunk):
        better = scores[start : start + chunk, None] > scores[None, :]
        right += int((better & (rewards[start : start + chunk, None] > rewards[None, :])).sum())
        pairs += int(better.sum())
    return right / pairs if pairs else None


def read_rows_as_sequences(
    data: str, sequences: Callable[[Any, str], tuple[dict, list[np.ndarray]]]
) -> tuple[list[dict], list[np.ndarray], list[int]]:
    """(rows, all their token sequences, how many each row has): every row of `data`, checked
    and turned into sequences by `sequences(row, where)` -> (checked row, its sequences)."""
    rows, every, counts = [], [], []
    for where, raw in read_rows(data):
        row, row_sequences = sequences(raw, where)
        rows.append(row)
        every.extend(row_sequences)
        counts.append(len(row_sequences))
    if not rows:
        raise UserError(f"{data}: no rows to evaluate")
    return rows, every, counts


def rewards_per_row(
    scorer: Scorer, sequences: list[np.ndarray], counts: list[int]
) -> list[np.ndarray]:
    bar = tqdm(desc="scoring", total=len(sequences), unit="seq", dynamic_ncols=True)
    with bar:
        rewards = scorer.rewards(sequences, bar)
    return np.split(rewards, np.cumsum(counts)[:-1])


# --- Best-of-N -----------------------------------------------------------------------------------


def n_values(max_n: int) -> list[int]:
    """1, 2, 4, ... up to `max_n`, and `max_n` itself."""
    values = [2**k for k in range(int(math.log2(max_n)) + 1)]
    return values if values[-1] == max_n else [*values, max_n]


def top_of_subset_accuracy(rewards: np.ndarray, correct: np.ndarray, n: int) -> float:
    """Expected correctness of the top-rewarded of a uniformly random n-subset (exact)."""
    m = len(rewards)
    total = math.comb(m, n)
    expected, higher = 0.0, 0
    for value in sorted(set(rewards.tolist()), reverse=True):
        group = rewards == value
        # The group is on top when the subset takes some of it and none of the higher ones.
        p_top = (math.comb(m - higher, n) - math.comb(m - higher - int(group.sum()), n)) / total
        expected += p_top * float(correct[group].mean())
        higher += int(group.sum())
    return expected


def oracle_accuracy(correct: np.ndarray, n: int) -> float:
    """Probability that a random n-subset holds a correct candidate."""
    m = len(correct)
    return 1 - math.comb(m - int(correct.sum()), n) / math.comb(m, n)


def majority_accuracy(
    answers: Sequence[str], correct: np.ndarray, n: int, samples: int, rng: np.random.Generator
) -> float:
    """Mean correctness of the most frequent answer of random n-subsets, ties split evenly."""
    m = len(answers)
    draws = 1 if n == m else samples
    total = 0.0
    for _ in range(draws):
        chosen = rng.choice(m, n, replace=False)
        votes = Counter(answers[i] for i in chosen)
        top = max(votes.values())
        winners = [a for a, v in votes.items() if v == top]
        total += np.mean([correct[[i for i in chosen if answers[i] == a]].mean() for a in winners])
    return total / draws


def best_of_n_report(
    rows: Sequence[dict], rewards: Sequence[np.ndarray], samples: int = 256, seed: int = 0
) -> dict[str, Any]:
    """{"n": [...], "reward": [...], "majority": [...], "random": [...], "oracle": [...]}."""
    max_n = min(len(r) for r in rewards)
    rng = np.random.default_rng(seed)
    corrects = [np.asarray(row["correct"], np.float64) for row in rows]
    answers = [
        [flatten(a).strip() for a in row.get("answers") or row["candidates"]] for row in rows
    ]
    with_answers = sum("answers" in row for row in rows)
    report: dict[str, Any] = {
        "rows": len(rows),
        "n": n_values(max_n),
        "majority_over": {0: "candidate texts", len(rows): "answers"}.get(with_answers, "mixed"),
    }
    for name in ("reward", "majority", "random", "oracle"):
        report[name] = []
    for n in report["n"]:
        per_row = {
            "reward": [
                top_of_subset_accuracy(r, c, n) for r, c in zip(rewards, corrects, strict=True)
            ],
            "majority": [
                majority_accuracy(a, c, n, samples, rng)
                for a, c in zip(answers, corrects, strict=True)
            ],
            "random": [float(c.mean()) for c in corrects],
            "oracle": [oracle_accuracy(c, n) for c in corrects],
        }
        for name, values in per_row.items():
            report[name].append(float(np.mean(values)))
    return report


def check_best_of_n_row(row: Any, scorer: Scorer, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise BadRow(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for field in ("prompt", "candidates", "correct"):
        if row.get(field) is None:
            raise BadRow(
                f"{where}: field '{field}' is missing (a best-of-n row needs prompt, "
                "candidates and correct)"
            )
    candidates, correct = row["candidates"], row["correct"]
    if not isinstance(candidates, list) or not candidates:
        raise BadRow(f"{where}: field 'candidates' must be a non-empty list of responses")
    if not isinstance(correct, list) or len(correct) != len(candidates):
        raise BadRow(
            f"{where}: field 'correct' must be a list with one entry per candidate "
            f"({len(candidates)})"
        )
    if any(not isinstance(c, bool | int) or c not in (0, 1) for c in correct):
        raise BadRow(f"{where}: field 'correct' must hold true/false (or 1/0) values")
    answers = row.get("answers")
    if answers is not None and (not isinstance(answers, list) or len(answers) != len(candidates)):
        raise BadRow(f"{where}: field 'answers' must be a list with one entry per candidate")
    for response in candidates:
        scorer.check_score_row({**row, "response": response}, where)
    return row


def best_of_n_file(scorer: Scorer, data: str, samples: int, seed: int) -> dict[str, Any]:
    def sequences(row: Any, where: str) -> tuple[dict, list[np.ndarray]]:
        row = check_best_of_n_row(row, scorer, where)
        return row, [scorer.score_sequence({**row, "response": c}) for c in row["candidates"]]

    rows, every, counts = read_rows_as_sequences(data, sequences)
    report = best_of_n_report(rows, rewards_per_row(scorer, every, counts), samples, seed)
    return {**report, "scoring": scorer.counts.summary()}


# --- command line --------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> None:
    print(json.dumps(evaluate_file(open_scorer(args), args.data, args.by), indent=2))


def cmd_best_of_n(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise UserError("--samples must be positive")
    report = best_of_n_file(open_scorer(args), args.data, args.samples, args.seed)
    print(json.dumps(report, indent=2))


def add_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    evaluate = commands.add_parser(
        "eval",
        help="preference accuracy of a checkpoint as JSON",
        description=__doc__.split("\n\n")[2],
    )
    add_scorer_options(evaluate)
    evaluate.add_argument("--data", required=True, help="preference rows (JSONL, Parquet, ...)")
    evaluate.add_argument("--by", metavar="FIELD", help="also report accuracy per value of FIELD")
    evaluate.set_defaults(run=cmd_eval)

    best = commands.add_parser(
        "best-of-n",
        help="accuracy of the top-scored of N candidates, beside majority vote and random",
        description=__doc__.split("\n\n")[3],
    )
    add_scorer_options(best)
    best.add_argument(
        "--data", required=True, help="rows {prompt, reference?, candidates, correct}"
    )
    best.add_argument("--samples", type=int, default=256, help="random subsets per row (majority)")
    best.add_argument("--seed", type=int, default=0)
    best.set_defaults(run=cmd_best_of_n)
