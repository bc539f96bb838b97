"""The training objectives over packed batches.

A batch holds, besides `tokens`, `segment_ids`, `positions` and `prefix_ids` [rows, length], the
index of the token where each response's reward is read, best response first: `reward_index`
[rows, slots, max_candidates], -1 where unused; `margin` [rows, slots]; and for CodePMP
`lm_weights` [rows, length] (1 where the next token is an LM target).

Each example ranks its responses. Its loss is Plackett-Luce, -sum_i log softmax_i(r_i, ..., r_K),
which for a pair is Bradley-Terry, -log sigmoid(r_chosen - r_rejected). So one loss covers all:
- polar: the pair (r(p, ref, chosen), r(p, ref, rejected)) of a triple, or a ranked list of
  candidates against one reference;
- pairwise: as TRL trains reward models, with the row's margin subtracted from the best
  response's reward (`loss.margin`) and `loss.center_rewards` * mean over examples of
  (sum of the example's rewards)^2, which for pairs is TRL's center_rewards_coefficient term;
- codepmp: the same plus `loss.lm_weight` * next-token cross-entropy on the chosen response.

Regression (`objective: regression`) has one response per example and its score, `target`
[rows, slots], or with a multi-attribute head a score per attribute, [rows, slots, attributes]
(NaN where not rated): the loss is the mean squared error of the head's outputs over the rated
entries, and its accuracy the share of example pairs of a batch with different scores (per
attribute) that the outputs order as the scores do.

Process rewards (`objective: prm`) read a reward at each step of a solution (`reward_index`
[rows, slots, max_steps]) with its label, `step_labels`: the loss is the mean over steps of the
binary cross-entropy of sigmoid(reward) against the label (soft labels too); accuracy is per step
(reward > 0 where label >= 0.5), and ProcessBench's F1 pairs the share of wrong solutions whose
first wrong step is found exactly with the share of right solutions judged right throughout.

Every loss is a sum over the micro-batch divided by a count over the whole batch (`totals`), so
gradients of micro-batches add up to the gradient of the batch. The statistics come back as sums
too; `summarize` turns sums into metrics.
"""

from typing import Any

import jax
import jax.numpy as jnp

from jaxrm.config import Config, DataConfig, LossConfig
from jaxrm.model.decoder import RewardModel, rewards_at
from jaxrm.train.flops import attention_pairs

Batch = dict[str, jax.Array]
NO_REWARD = -1e9  # stands for a missing response; exp() of it is 0, and it stays finite


def attention_span(data: DataConfig) -> int:
    """How far back a token of a packed row can attend: its sequence is at most
    data.max_length tokens, and with a shared prefix the example's other candidates may sit
    between it and the prefix."""
    return data.max_length * (data.max_candidates if data.shared_prefix else 1)


def final_hidden(model: RewardModel, batch: Batch, span: int | None = None) -> jax.Array:
    """The model's final-normed hidden states of the batch's packed rows."""
    return model(
        batch["tokens"], batch["segment_ids"], batch["positions"], batch.get("prefix_ids"), span
    )


def ranked_rewards(
    model: RewardModel, batch: Batch, span: int | None = None, hidden: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(hidden states, rewards [rows, slots, K], valid [rows, slots, K]); `hidden` given is used
    instead of running the model."""
    if hidden is None:
        hidden = final_hidden(model, batch, span)
    index = batch["reward_index"]
    rows, slots, k = index.shape
    rewards = rewards_at(model.token_rewards(hidden), index.reshape(rows, slots * k))
    return hidden, rewards.reshape(rows, slots, k), index >= 0


def plackett_luce(rewards: jax.Array, valid: jax.Array, margin: jax.Array) -> jax.Array:
    """Per example [..., K] -> [...]: -sum_i log(exp(r_i) / sum_{j >= i} exp(r_j)) over the
    ranked responses, the best one's reward lowered by `margin`. For K = 2 this is
    -log sigmoid(r_0 - margin - r_1)."""
    scores = jnp.where(valid, rewards, NO_REWARD)
    scores = scores.at[..., 0].add(-margin)
    rest = jax.lax.cumlogsumexp(scores, axis=scores.ndim - 1, reverse=True)
    has_next = jnp.concatenate([valid[..., 1:], jnp.zeros_like(valid[..., :1])], axis=-1)
    return jnp.sum(jnp.where(has_next, rest - scores, 0.0), axis=-1)


def totals(batch: Batch) -> dict[str, jax.Array]:
    """The whole batch's counts that losses are divided by."""
    index = batch["reward_index"]
    if "step_labels" in batch:
        examples = index >= 0  # every judged step
    elif "target" in batch:
        examples = index[..., 0] >= 0
    else:
        examples = _ranked(index >= 0)
    counts = {"examples": jnp.maximum(jnp.sum(examples), 1)}
    if "target" in batch:
        rated = targets(batch)[1] & (index[..., 0] >= 0)[..., None]
        counts["ratings"] = jnp.maximum(jnp.sum(rated), 1)
    if "lm_weights" in batch:
        counts["lm_tokens"] = jnp.maximum(jnp.sum(batch["lm_weights"]), 1.0)
    return counts


def _ranked(valid: jax.Array) -> jax.Array:
    """Examples with at least two responses."""
    return valid[..., 0] & valid[..., 1]


def objective(
    model: RewardModel,
    batch: Batch,
    config: Config,
    totals: dict[str, jax.Array],
    hidden: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(this part's share of the batch loss, summed statistics). `hidden` (optional): the
    batch's final hidden states, already computed (a fused optimizer runs the layers itself)."""
    if config.objective == "regression":
        return regression(model, batch, config, totals, hidden)
    if config.objective == "prm":
        return process_rewards(model, batch, config, totals, hidden)
    span = attention_span(config.data)
    hidden, rewards, valid = ranked_rewards(model, batch, span, hidden)
    examples = _ranked(valid)
    margin = batch["margin"] if config.loss.margin else jnp.zeros_like(batch["margin"])
    rank_losses = jnp.where(examples, plackett_luce(rewards, valid, margin), 0.0)
    loss = jnp.sum(rank_losses) / totals["examples"]
    present = jnp.where(valid, rewards, 0.0)
    centering = jnp.sum(jnp.where(examples, jnp.sum(present, axis=-1) ** 2, 0.0))
    if config.loss.center_rewards:
        loss += config.loss.center_rewards * centering / totals["examples"]
    others = jnp.where(valid[..., 1:], rewards[..., 1:], -jnp.inf)
    correct = examples & (rewards[..., 0] > jnp.max(others, axis=-1))
    sums = {
        "rank_loss": jnp.sum(rank_losses),
        "centering": centering,
        "examples": jnp.sum(examples),
        "correct": jnp.sum(correct),
        "margin_sum": jnp.sum(jnp.where(examples, rewards[..., 0] - rewards[..., 1], 0.0)),
        **_common_sums(batch, present, valid),
    }
    if "lm_weights" in batch:
        lm_sum = next_token_loss(model, hidden, batch["tokens"], batch["lm_weights"])
        loss += config.loss.lm_weight * lm_sum / totals["lm_tokens"]
        sums["lm_loss"] = lm_sum
        sums["lm_tokens"] = jnp.sum(batch["lm_weights"])
    return loss, sums


def regression(
    model: RewardModel,
    batch: Batch,
    config: Config,
    totals: dict[str, jax.Array],
    hidden: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared error of each example's head outputs against its `target` scores, over the
    (example, attribute) entries that are rated."""
    if hidden is None:
        hidden = final_hidden(model, batch, attention_span(config.data))
    index = batch["reward_index"][..., 0]
    outputs = model.token_scores(hidden)
    scores = jax.vmap(rewards_at, in_axes=(-1, None), out_axes=-1)(outputs, index)
    target, rated = targets(batch)
    rated &= (index >= 0)[..., None]
    squared = jnp.sum(jnp.where(rated, (scores - jnp.where(rated, target, 0.0)) ** 2, 0.0))
    k = scores.shape[-1]
    s, t, r = (
        scores.reshape(-1, k),
        jnp.where(rated, target, 0.0).reshape(-1, k),
        rated.reshape(-1, k),
    )
    ordered = r[:, None] & r[None, :] & (t[:, None] > t[None, :])  # pairs with a better one
    present = index >= 0
    reward = jnp.where(present, model.reward_of(scores), 0.0)
    sums = {
        "squared_error": squared,
        "ratings": jnp.sum(rated),
        "examples": jnp.sum(present),
        "pairs": jnp.sum(ordered),
        "correct": jnp.sum(ordered & (s[:, None] > s[None, :])),
        **_common_sums(batch, reward, present),
    }
    return squared / totals["ratings"], sums


def targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(regression targets [rows, slots, attributes], which of them are rated)."""
    target = batch["target"]
    target = target[..., None] if target.ndim == 2 else target
    return target, ~jnp.isnan(target)


def process_rewards(
    model: RewardModel,
    batch: Batch,
    config: Config,
    totals: dict[str, jax.Array],
    hidden: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Binary cross-entropy of every judged step's reward (a logit) against its label."""
    _, rewards, valid = ranked_rewards(model, batch, attention_span(config.data), hidden)
    labels = batch["step_labels"]
    cross_entropy = (
        jnp.maximum(rewards, 0) - rewards * labels + jnp.log1p(jnp.exp(-jnp.abs(rewards)))
    )
    cross_entropy = jnp.where(valid, cross_entropy, 0.0)
    steps = rewards.shape[-1]
    first = lambda wrong: jnp.min(jnp.where(valid & wrong, jnp.arange(steps), steps), axis=-1)  # noqa: E731
    labelled_first, judged_first = first(labels < 0.5), first(rewards <= 0)
    solutions = valid[..., 0]
    wrong = solutions & (labelled_first < steps)
    sums = {
        "cross_entropy": jnp.sum(cross_entropy),
        "examples": jnp.sum(valid),
        "correct": jnp.sum(valid & ((rewards > 0) == (labels >= 0.5))),
        "solutions": jnp.sum(solutions),
        "wrong_solutions": jnp.sum(wrong),
        "first_error_found": jnp.sum(wrong & (judged_first == labelled_first)),
        "right_judged_right": jnp.sum(solutions & ~wrong & (judged_first == steps)),
        **_common_sums(batch, jnp.where(valid, rewards, 0.0), valid),
    }
    return jnp.sum(cross_entropy) / totals["examples"], sums


def process_metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Step accuracy and ProcessBench's first-error F1 from summed statistics."""
    steps = max(float(sums["examples"]), 1.0)
    wrong, solutions = float(sums["wrong_solutions"]), float(sums["solutions"])
    found = float(sums["first_error_found"]) / wrong if wrong else 0.0
    right = solutions - wrong
    kept = float(sums["right_judged_right"]) / right if right else 0.0
    f1 = 2 * found * kept / (found + kept) if found + kept else 0.0
    return {
        "loss": float(sums["cross_entropy"]) / steps,
        "accuracy": float(sums["correct"]) / steps,
        "step_accuracy": float(sums["correct"]) / steps,
        "first_error_accuracy": found,
        "right_solution_accuracy": kept,
        "first_error_f1": f1,
    }


def _common_sums(batch: Batch, present: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """The statistics of every objective: rewards (`present`, 0 where not `valid`) and work."""
    sums = {
        "reward_sum": jnp.sum(present),
        "reward_sq_sum": jnp.sum(present**2),
        "rewards": jnp.sum(valid),
        "tokens": jnp.sum(batch["segment_ids"] != 0),
        "attention_pairs": attention_pairs(
            batch["positions"].astype(jnp.float32), batch["segment_ids"]
        ),
    }
    if "bad_rows" in batch:
        sums["bad_rows"] = jnp.sum(batch["bad_rows"])
    return sums


def next_token_loss(
    model: RewardModel, hidden: jax.Array, tokens: jax.Array, weights: jax.Array
) -> jax.Array:
    """Sum over positions of weight * cross-entropy of predicting the next token."""
    logits = model.lm_logits(hidden)
    targets = jnp.roll(tokens, -1, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(weights * losses)


def summarize(sums: dict[str, Any], config: LossConfig) -> dict[str, float]:
    """Metrics from summed statistics (over micro-batches, steps or evaluation batches); `loss`
    is the objective over all of them pooled, which for one step is that step's loss."""
    examples = max(float(sums["examples"]), 1.0)
    rewards = max(float(sums["rewards"]), 1.0)
    mean = float(sums["reward_sum"]) / rewards
    spread = {
        "reward_mean": mean,
        "reward_std": max(float(sums["reward_sq_sum"]) / rewards - mean**2, 0.0) ** 0.5,
    }
    if "cross_entropy" in sums:
        return {**process_metrics(sums), **spread}
    if "squared_error" in sums:
        mse = float(sums["squared_error"]) / max(float(sums["ratings"]), 1.0)
        accuracy = float(sums["correct"]) / max(float(sums["pairs"]), 1.0)
        return {"loss": mse, "accuracy": accuracy, "mse": mse, **spread}
    rank_loss = float(sums["rank_loss"]) / examples
    metrics = {
        "loss": rank_loss + config.center_rewards * float(sums["centering"]) / examples,
        "accuracy": float(sums["correct"]) / examples,
        "rank_loss": rank_loss,
        **spread,
        "margin": float(sums["margin_sum"]) / examples,
    }
    if "lm_loss" in sums:
        metrics["lm_loss"] = float(sums["lm_loss"]) / max(float(sums["lm_tokens"]), 1.0)
        metrics["loss"] += config.lm_weight * metrics["lm_loss"]
    return metrics
