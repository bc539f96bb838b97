"""Preference losses over packed batches.

A pair batch holds, besides `tokens`, `segment_ids` and `positions` [rows, length], the indices of
the tokens where each pair's rewards are read: `chosen_index` and `rejected_index` [rows, pairs],
-1 for unused pair slots. POLAR triples are pairs too: both candidates carry the same prompt and
reference, so r(p, ref, chosen) and r(p, ref, rejected) are read like any chosen/rejected pair.
"""

from typing import Any

import jax
import jax.numpy as jnp

from jaxrm.model import RewardModel, rewards_at

Batch = dict[str, jax.Array]


def bradley_terry(chosen: jax.Array, rejected: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of -log sigmoid(chosen - rejected) over the valid pairs."""
    losses = -jax.nn.log_sigmoid(chosen - rejected)
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def pair_rewards(model: RewardModel, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen, rejected, valid), each [rows, pairs]."""
    hidden = model(
        batch["tokens"], batch["segment_ids"], batch["positions"], batch.get("prefix_ids")
    )
    scores = model.token_rewards(hidden)
    chosen = rewards_at(scores, batch["chosen_index"])
    rejected = rewards_at(scores, batch["rejected_index"])
    valid = (batch["chosen_index"] >= 0) & (batch["rejected_index"] >= 0)
    return chosen, rejected, valid


def pairwise_loss(model: RewardModel, batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
    chosen, rejected, valid = pair_rewards(model, batch)
    loss = bradley_terry(chosen, rejected, valid)
    count = jnp.maximum(jnp.sum(valid), 1)
    accuracy = jnp.sum(jnp.where(valid, chosen > rejected, False)) / count
    return loss, {"loss": loss, "accuracy": accuracy}
