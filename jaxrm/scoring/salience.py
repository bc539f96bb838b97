"""Capability salience (arXiv 2506.13216): which validation losses predict a downstream score.

    jaxrm salience collect runs/small runs/large --data val.jsonl --eval bench.jsonl \
        --by category --out table.jsonl
    jaxrm salience fit table.jsonl --target accuracy [--held-out-run runs/large]

A validation set's loss is a mean over its units (here: each example's ranking loss and, with an
LM head, each LM-target token's loss), every unit weighted alike. The paper's point is that
downstream capabilities follow some units more than others, so it learns a weight per unit (a
salience vector, one per capability) under which the weighted loss predicts the capability
across checkpoints far better than the mean loss does.

`collect` scores every checkpoint of the given runs on the validation rows (`--data`, preference
rows of the model's objective) and on downstream rows (`--eval`, judged as `jaxrm eval` judges
them, per `--by` group too) and writes one JSONL line per checkpoint: run, step, the unit losses
in a fixed order, and the downstream scores (`accuracy`, `accuracy/<group>`).

`fit` learns, for one target score y, the salience vector and a sigmoid law together:

    w = softmax(theta)                      non-negative, sums to 1: a weighted mean of losses
    L_w = sum_i w_i * loss_i                (theta = 0 is the plain mean loss)
    y_hat = floor + (1 - floor) * sigmoid(k * (m - L_w)),  k > 0

minimising the squared error over the fitting checkpoints plus `l2` * mean(theta^2), which
pulls the weights towards the mean loss where the data do not say otherwise (there are far more
units than checkpoints). `l2` is the value of L2_GRID whose fits best predict the checkpoints
left out in 5-fold cross-validation over the fitting checkpoints (or `--l2`). The same law
fitted on the plain mean loss (theta fixed at 0) is the baseline. Both are judged by R^2 on
held-out checkpoints: those of `--held-out-run` runs, or else every `--held-out-every`-th. Choices of ours where the paper's text was not at hand:
the softmax parameterisation, the L2 pull towards uniform weights chosen by cross-validation,
and Adam on the joint objective (the paper fits its weights and a sigmoid law jointly).
"""

import argparse
import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxrm import storage
from jaxrm.checkpoint.loading import run_checkpoints
from jaxrm.data.rows import check_row
from jaxrm.data.sources import read_rows
from jaxrm.errors import UserError
from jaxrm.scoring.evaluate import evaluate_file
from jaxrm.scoring.scorer import Scorer, bucket_length
from jaxrm.storage import staged_file


@dataclasses.dataclass(frozen=True)
class SalienceLaw:
    """y_hat = floor + (1 - floor) * sigmoid(slope * (midpoint - weights @ losses))."""

    weights: np.ndarray
    slope: float
    midpoint: float
    floor: float
    l2: float | None = None  # the pull to uniform weights it was fitted with

    def weighted_loss(self, losses: np.ndarray) -> np.ndarray:
        return np.asarray(losses, np.float64) @ self.weights

    def __call__(self, losses: np.ndarray) -> np.ndarray:
        z = self.slope * (self.midpoint - self.weighted_loss(losses))
        return self.floor + (1 - self.floor) / (1 + np.exp(-z))


def r_squared(predicted: np.ndarray, actual: np.ndarray) -> float | None:
    """1 - SS_res / SS_tot; None where the actual values do not vary."""
    actual = np.asarray(actual, np.float64)
    total = float(((actual - actual.mean()) ** 2).sum())
    if total == 0:
        return None
    return 1 - float(((np.asarray(predicted) - actual) ** 2).sum()) / total


L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def fit_salience(
    losses: np.ndarray,
    scores: np.ndarray,
    *,
    floor: float = 0.0,
    l2: float | None = None,
    folds: int = 5,
    steps: int = 3000,
    uniform: bool = False,
) -> SalienceLaw:
    """The salience vector and sigmoid law that best map `losses` [checkpoints, units] to
    `scores` [checkpoints]; `uniform` fits the law on the plain mean loss only. Without `l2`,
    the pull to uniform weights is the one of L2_GRID whose fits predict left-out checkpoints
    best (`folds`-fold cross-validation over the given checkpoints)."""
    x = jnp.asarray(losses, jnp.float32)
    y = jnp.asarray(scores, jnp.float32)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 3:
        raise UserError(
            f"salience needs 3 or more checkpoints with one score each, got losses {x.shape} "
            f"and scores {y.shape}"
        )
    everything = jnp.ones(len(y), jnp.float32)
    if l2 is None and not uniform:
        fold = jnp.arange(len(y)) % min(folds, len(y))
        masks = jnp.stack([(fold != f).astype(jnp.float32) for f in range(int(fold.max()) + 1)])
        grid = jnp.asarray(L2_GRID, jnp.float32)
        pairs_l2 = jnp.repeat(grid, len(masks))
        pairs_mask = jnp.tile(masks, (len(grid), 1))
        fitted = jax.vmap(_fit, in_axes=(None, None, 0, 0, None, None, None))(
            x, y, pairs_mask, pairs_l2, floor, steps, False
        )
        predicted = jax.vmap(_law, in_axes=(0, None, None, None))(fitted, x, floor, False)
        left_out = 1 - pairs_mask
        errors = jnp.sum(left_out * (predicted - y) ** 2, axis=1).reshape(len(grid), -1).sum(1)
        l2 = L2_GRID[int(jnp.argmin(errors))]
    params = _fit(x, y, everything, jnp.float32(l2 or 0.0), floor, steps, uniform)
    theta = np.zeros(x.shape[1]) if uniform else np.asarray(params["theta"], np.float64)
    weights = np.exp(theta - theta.max())
    return SalienceLaw(
        weights=weights / weights.sum(),
        slope=float(np.exp(params["log_slope"])),
        midpoint=float(params["midpoint"]),
        floor=floor,
        l2=None if uniform else l2,
    )


def _law(params: dict, x: jax.Array, floor: float, uniform: bool) -> jax.Array:
    theta = jnp.zeros_like(params["theta"]) if uniform else params["theta"]
    slope = jnp.exp(params["log_slope"])
    return floor + (1 - floor) * jax.nn.sigmoid(
        slope * (params["midpoint"] - x @ jax.nn.softmax(theta))
    )


@functools.partial(jax.jit, static_argnames=("floor", "steps", "uniform"))
def _fit(
    x: jax.Array,
    y: jax.Array,
    mask: jax.Array,
    l2: jax.Array,
    floor: float,
    steps: int,
    uniform: bool,
) -> dict:
    """Adam on the squared error over the checkpoints `mask` keeps, plus l2 * mean(theta^2)."""
    mean = x.mean(axis=1)
    spread = jnp.maximum(mean.std(), 1e-6)
    params = {
        "theta": jnp.zeros(x.shape[1], jnp.float32),
        "log_slope": jnp.log(4.0 / spread),  # the law spans the losses seen
        "midpoint": mean.mean(),
    }

    def objective(p: dict) -> jax.Array:
        error = jnp.sum(mask * (_law(p, x, floor, uniform) - y) ** 2) / jnp.sum(mask)
        return error + l2 * jnp.mean(p["theta"] ** 2)

    optimizer = optax.adam(0.05)

    def step(carry: tuple, _: Any) -> tuple:
        p, state = carry
        updates, state = optimizer.update(jax.grad(objective)(p), state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


# --- unit losses and downstream scores of checkpoints --------------------------------------------


def ranking_losses(rewards: Sequence[np.ndarray], margins: Sequence[float]) -> np.ndarray:
    """Each example's Plackett-Luce loss over its rewards (best first, the best one lowered by
    its margin), as training computes it: for a pair, -log sigmoid(r_0 - margin - r_1)."""
    out = []
    for reward, margin in zip(rewards, margins, strict=True):
        r = np.asarray(reward, np.float64).copy()
        r[0] -= margin
        rest = np.logaddexp.accumulate(r[::-1])[::-1]
        out.append(float((rest - r)[:-1].sum()))
    return np.asarray(out)


def token_losses(
    scorer: Scorer, sequences: Sequence[np.ndarray], rows: int = 8
) -> list[np.ndarray]:
    """Next-token cross-entropy at every position of each sequence but its last (the model's
    LM head), `rows` sequences at a time, each alone in its row, all padded to one length."""
    graphdef = scorer.graphdef

    @jax.jit
    def losses(state: Any, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        places = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        segments = (places < lengths[:, None]).astype(jnp.int32)
        logits = model.lm_logits(model(tokens, segments, places, jnp.zeros_like(tokens)))
        targets = jnp.roll(tokens, -1, axis=-1)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    width = bucket_length(max(len(s) for s in sequences))
    out = []
    for start in range(0, len(sequences), rows):
        chunk = sequences[start : start + rows]
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.zeros(rows, np.int32)
        for r, sequence in enumerate(chunk):
            tokens[r, : len(sequence)] = sequence
            lengths[r] = len(sequence)
        values = np.asarray(losses(scorer.state, tokens, lengths), np.float64)
        out += [values[r, : len(s) - 1] for r, s in enumerate(chunk)]
    return out


def checkpoint_units(scorer: Scorer, data: str) -> dict[str, Any]:
    """The unit losses of one checkpoint on the validation rows of `data`, in row order: each
    example's ranking loss (`rank`; the squared error for regression) and, with an LM head and
    LM targets (CodePMP), each target token's loss (`lm`, with the row of each in `lm_rows`)."""
    if scorer.objective == "prm":
        raise UserError("salience: process reward models are not supported (their units are steps)")
    attributes = scorer.attributes if scorer.objective == "regression" else []
    examples = []
    for where, row in read_rows(data):
        examples.append(scorer.template(check_row(row, scorer.objective, where, attributes)))
    if not examples:
        raise UserError(f"{data}: no rows to score")
    counts = [len(e.sequences) for e in examples]
    flat = [s for e in examples for s in e.sequences]
    if scorer.objective == "regression":
        outputs = scorer.scores(flat).reshape(len(examples), -1)
        targets = np.asarray([np.atleast_1d(e.target) for e in examples], np.float64)
        rated = ~np.isnan(targets)
        squared = np.where(rated, (outputs - np.where(rated, targets, 0.0)) ** 2, 0.0)
        rank = squared.sum(axis=1) / np.maximum(rated.sum(axis=1), 1)
    else:
        rewards = np.split(scorer.rewards(flat), np.cumsum(counts)[:-1])
        margins = [e.margin if scorer.config.loss.margin else 0.0 for e in examples]
        rank = ranking_losses(rewards, margins)
    units: dict[str, Any] = {"rank": rank.tolist()}
    lm = [(i, e) for i, e in enumerate(examples) if e.lm_mask is not None]
    if scorer.config.model.lm_head and lm:
        per_token = token_losses(scorer, [e.sequences[0] for _, e in lm])
        # lm_mask marks target tokens; token j is predicted at position j - 1.
        kept = [
            (i, values[e.lm_mask[1:] == 1]) for (i, e), values in zip(lm, per_token, strict=True)
        ]
        units["lm"] = np.concatenate([v for _, v in kept]).tolist()
        units["lm_rows"] = [i for i, v in kept for _ in range(len(v))]
    return units


def downstream_scores(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a `jaxrm eval` report, flat: `accuracy`, ... and `accuracy/<group>`."""
    scores = {k: float(v) for k, v in report.items() if _number(v) and k != "examples"}
    for groups in (report.get("by") or {}).values():
        for group, fits in groups.items():
            scores.update(
                {
                    f"{k}/{group}": float(v)
                    for k, v in fits.items()
                    if _number(v) and k != "examples"
                }
            )
    return scores


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def collect(
    runs: Sequence[str], data: str, downstream: str, by: str | None, out: str
) -> dict[str, Any]:
    """Writes a line per checkpoint of `runs` to the JSONL file `out`: its unit losses on `data`
    and its downstream scores on `downstream` (see the module's text)."""
    targets = [(run, step, path) for run in runs for step, path in run_checkpoints(run)]
    missing = [run for run in runs if not any(t[0] == run for t in targets)]
    if missing:
        raise UserError(f"{missing[0]}: a run directory with checkpoints/ is needed")
    out_path = storage.absolute(out)
    if storage.exists(out_path):
        raise UserError(f"{out_path} already exists; choose a new --out")
    with staged_file(out_path) as staging, staging.open("w", encoding="utf-8") as f:
        for run, step, path in tqdm(targets, desc="checkpoints", unit="ckpt", dynamic_ncols=True):
            scorer = Scorer.open(path)
            units = checkpoint_units(scorer, data)
            scores = downstream_scores(evaluate_file(scorer, downstream, by))
            line = {"run": str(run).rstrip("/"), "step": step, "units": units, "scores": scores}
            f.write(json.dumps(line) + "\n")
    return {"checkpoints": len(targets), "out": str(out_path)}


# --- fitting a table -----------------------------------------------------------------------------

UNIT_KINDS = ("rank", "lm", "all")


@dataclasses.dataclass
class Table:
    """A `collect` table: per checkpoint its run, step, unit losses and downstream scores."""

    runs: list[str]
    steps: list[int]
    losses: np.ndarray  # [checkpoints, units]
    scores: list[dict[str, float]]
    unit_names: list[str]  # "rank:<row>" or "lm:<row>"

    @classmethod
    def read(cls, path: str, units: str) -> "Table":
        if units not in UNIT_KINDS:
            raise UserError(f"--units {units!r}: choose from {', '.join(UNIT_KINDS)}")
        lines = [line for line in storage.read_text_file(path).splitlines() if line.strip()]
        if not lines:
            raise UserError(f"{path}: no checkpoints")
        runs, steps, rows, scores, names = [], [], [], [], None
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                kinds = ("rank", "lm") if units == "all" else (units,)
                values = [v for k in kinds for v in entry["units"].get(k, [])]
                labels = [f"rank:{i}" for i in range(len(entry["units"]["rank"]))]
                labels = (labels if "rank" in kinds else []) + [
                    f"lm:{i}" for i in entry["units"].get("lm_rows", []) if "lm" in kinds
                ]
                runs.append(str(entry["run"]))
                steps.append(int(entry["step"]))
                scores.append(dict(entry["scores"]))
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{number}: not a salience table line ({e})") from None
            if not values:
                raise UserError(f"{path}:{number}: no {units} unit losses (an LM head gives lm)")
            if names is not None and labels != names:
                raise UserError(
                    f"{path}:{number}: other units than line 1 ({len(labels)} against "
                    f"{len(names)}); collect every checkpoint on the same --data"
                )
            names = labels
            rows.append(values)
        return cls(runs, steps, np.asarray(rows, np.float64), scores, names or [])

    def target(self, name: str, path: str) -> np.ndarray:
        missing = [i for i, s in enumerate(self.scores) if name not in s]
        if missing:
            known = ", ".join(sorted(self.scores[missing[0]])[:12])
            raise UserError(f"{path}:{missing[0] + 1}: no score {name!r} (it has {known})")
        return np.asarray([s[name] for s in self.scores])


def held_out_mask(table: Table, runs: Sequence[str], every: int) -> np.ndarray:
    """Checkpoints left out of the fit: those of `runs`, or else every `every`-th."""
    if runs:
        runs = [str(r).rstrip("/") for r in runs]
        unknown = [r for r in runs if r not in table.runs]
        if unknown:
            raise UserError(
                f"--held-out-run {unknown[0]}: not a run of the table ({', '.join(sorted(set(table.runs)))})"
            )
        return np.isin(np.asarray(table.runs), list(runs))
    if every < 2:
        raise UserError("--held-out-every must be 2 or more")
    return np.arange(len(table.runs)) % every == every - 1


def fit_report(
    table: Table,
    target: str,
    held_out: np.ndarray,
    floor: float,
    l2: float | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """Salience against the mean loss: each fitted on the kept checkpoints, judged by R^2 on
    the held-out ones (and on the kept ones)."""
    y = table.target(target, "table")
    kept = ~held_out
    if kept.sum() < 3 or held_out.sum() < 2:
        raise UserError(
            f"need 3 or more checkpoints to fit and 2 or more held out, got {int(kept.sum())} "
            f"and {int(held_out.sum())}"
        )
    x = table.losses
    laws = {
        "salience": fit_salience(x[kept], y[kept], floor=floor, l2=l2),
        "mean_loss": fit_salience(x[kept], y[kept], floor=floor, uniform=True),
    }
    report: dict[str, Any] = {
        "target": target,
        "units": x.shape[1],
        "checkpoints": {"fit": int(kept.sum()), "held_out": int(held_out.sum())},
    }
    for name, law in laws.items():
        report[name] = {
            "r2_held_out": r_squared(law(x[held_out]), y[held_out]),
            "r2_fit": r_squared(law(x[kept]), y[kept]),
            "slope": law.slope,
            "midpoint": law.midpoint,
        }
    weights = laws["salience"].weights
    order = np.argsort(-weights)[:top]
    report["salience"]["top_units"] = [
        {"unit": table.unit_names[i], "weight": float(weights[i])} for i in order
    ]
    report["salience"]["top_weight_share"] = float(weights[order].sum())
    report["salience"]["l2"] = laws["salience"].l2
    report["uniform_weight"] = 1 / len(weights)
    return report


def cmd_collect(args: argparse.Namespace) -> None:
    storage.use_compile_cache(args.compile_cache)  # checkpoints of a run share their programs
    print(json.dumps(collect(args.runs, args.data, args.eval, args.by, args.out)))


def cmd_fit(args: argparse.Namespace) -> None:
    table = Table.read(args.table, args.units)
    held_out = held_out_mask(table, args.held_out_run, args.held_out_every)
    print(json.dumps(fit_report(table, args.target, held_out, args.floor, args.l2), indent=2))


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    salience = commands.add_parser(
        "salience",
        help="which validation losses predict a downstream score (capability salience)",
        description="Capability salience (arXiv 2506.13216): collect unit losses and downstream "
        "scores of a series of checkpoints, then fit a weight per unit so that the weighted loss "
        "predicts a score better than the mean loss does.",
    )
    actions = salience.add_subparsers(dest="action", required=True)
    collecting = actions.add_parser("collect", help="unit losses and scores of every checkpoint")
    collecting.add_argument("runs", nargs="+", metavar="RUN_DIR")
    collecting.add_argument("--data", required=True, help="validation rows (the unit losses)")
    collecting.add_argument("--eval", required=True, help="downstream rows, judged as jaxrm eval")
    collecting.add_argument("--by", help="a row field: scores per group too (accuracy/<group>)")
    collecting.add_argument("--out", required=True, help="new JSONL table, a line per checkpoint")
    storage.add_compile_cache_option(collecting)
    collecting.set_defaults(run=cmd_collect)
    fitting = actions.add_parser("fit", help="fit and judge a salience vector for one score")
    fitting.add_argument("table", metavar="TABLE")
    fitting.add_argument("--target", default="accuracy", help="a score of the table")
    fitting.add_argument("--units", default="all", choices=UNIT_KINDS)
    fitting.add_argument("--held-out-run", action="append", default=[], metavar="RUN_DIR")
    fitting.add_argument("--held-out-every", type=int, default=3)
    fitting.add_argument(
        "--floor", type=float, default=0.0, help="the score at chance (0.5 for pairs)"
    )
    fitting.add_argument(
        "--l2",
        type=float,
        help="pull of the weights to uniform (default: chosen by 5-fold cross-validation)",
    )
    fitting.set_defaults(run=cmd_fit)
