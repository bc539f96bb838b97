"""Pipeline stages (`mesh.stage`): contiguous groups of layers on different devices, with
micro-batches streamed through them (GPipe).

The stacked layers [layers, ...] are split over the `stage` mesh axis in contiguous blocks (the
`layers` rule), so stage s holds layers s*L/S ... (s+1)*L/S - 1; viewed as [stages, L/S, ...]
each device group computes its own block. A buffer [stages, rows, length, embed] holds the
activation each stage works on. Every tick, stage 0 takes the next micro-batch, every stage runs
its layers on its slot (one vmap over the stage axis: each device group computes its own), the
last stage's output is kept, and the buffer shifts by one stage (a collective permute). M
micro-batches take M + S - 1 ticks; in the first and last S - 1 some stages work on nothing
(the bubble, (S - 1) / (M + S - 1) of the ticks). Autodiff of the ticks is the backward schedule:
all forwards, then all backwards, as GPipe runs them.

Rows are split into micro-batches as accumulation splits them (each part takes rows from every
device), and put back in order afterwards, so the hidden states equal the unpipelined ones.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrm.model.decoder import HIDDEN, RewardModel
from jaxrm.sharding import constrain, merge_rows, split_rows


def pipelined_hidden(
    model: RewardModel,
    tokens: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    prefix_ids: jax.Array | None,
    span: int | None,
    stages: int,
    parts: int,
) -> jax.Array:
    """The model's final-normed hidden states, its layers run as `stages` pipeline stages over
    `parts` micro-batches."""
    limit = tokens.shape[1]
    side = {"segment_ids": segment_ids, "positions": positions}
    if prefix_ids is not None:
        side["prefix_ids"] = prefix_ids
    micro_x = split_rows(model.embed_tokens(tokens), parts)  # [parts, rows, length, embed]
    micro_side = jax.tree.map(lambda x: split_rows(x, parts), side)
    blocks = jax.tree.map(
        lambda x: x.reshape(stages, x.shape[0] // stages, *x.shape[1:]), nnx.state(model.layers)
    )

    def run_block(block: Any, h: jax.Array, side: dict) -> jax.Array:
        attend = model.packed_attention(side["segment_ids"], side.get("prefix_ids"), span)
        return model.run_stack(block, h, side["positions"], attend, position_limit=limit)[0]

    run_stages = jax.vmap(run_block, spmd_axis_name="stage")
    stage_ids = jnp.arange(stages)

    def tick(carry: tuple, t: jax.Array) -> tuple[tuple, None]:
        buffer, outputs = carry
        fed = jnp.minimum(t, parts - 1)
        buffer = buffer.at[0].set(jnp.where(t < parts, micro_x[fed], buffer[0]))
        held = jnp.clip(t - stage_ids, 0, parts - 1)  # the micro-batch each stage works on
        stage_side = jax.tree.map(
            lambda x: constrain(x[held], ("stages", "batch", "length")), micro_side
        )
        buffer = constrain(run_stages(blocks, buffer, stage_side), ("stages", *HIDDEN))
        done = t - (stages - 1)  # the micro-batch the last stage has just finished
        slot = jnp.maximum(done, 0)
        outputs = outputs.at[slot].set(jnp.where(done >= 0, buffer[-1], outputs[slot]))
        return (jnp.roll(buffer, 1, axis=0), outputs), None

    buffer = constrain(jnp.zeros((stages, *micro_x.shape[1:]), micro_x.dtype), ("stages", *HIDDEN))
    ticks = jnp.arange(parts + stages - 1)
    (_, outputs), _ = jax.lax.scan(tick, (buffer, jnp.zeros_like(micro_x)), ticks)
    return model.final_norm(constrain(merge_rows(outputs), HIDDEN))
