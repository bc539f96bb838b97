"""The train step of LOMO and AdaLomo: each layer is updated as soon as the backward pass has its
gradient, so the model's gradients never exist at once (LOMO, arXiv 2306.09782; CoLLiE, arXiv
2312.00407; the update rules are `optimizers.FusedOptimizer`).

1. Forward, per micro-batch: embed, run the layer stack keeping each layer's input (what
   `model.remat: full` keeps).
2. Head: the objective on the last layer's output, with its gradient for the head parameters
   (final norm, reward head, LM head) and for that output.
3. Walk back through the layers (a reverse scan): recompute layer i from its kept input, pull
   every micro-batch's cotangent through it, summing its gradient over them (the batch's exact
   gradient of layer i), update layer i in place, pass the cotangents on.
4. The embedding last.
Every gradient is taken at the step's starting parameters (a layer is updated after its own
backward and read by nothing later), so a fused step equals the same update applied to the whole
gradient. The walk recomputes each layer's forward, so `model.remat` changes nothing here.

Clipping (`optimizer.grad_clip`) needs the global norm before the first update: the walk then
runs twice, first only summing squared gradients, as LOMO's two backward passes do. AdaLomo's
update normalisation stands in for clipping, so `grad_clip: null` is its usual setting.

Micro-batches (`train.micro_batches`) bound one layer's recomputed activations; every micro-batch's
layer inputs are kept until the walk has passed that layer.

A step whose loss is not finite (or, when clipping, whose gradient norm is not) changes nothing.
A parameter group (the head, a layer, the embedding) whose gradient is not finite is left as it
was and the step is reported non-finite, which stops the run; groups already updated keep their
update, as taking it back would need the copy of the model a fused update exists to avoid.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrm.config import Config
from jaxrm.model.decoder import HIDDEN
from jaxrm.sharding import constrain, split_rows
from jaxrm.train import losses
from jaxrm.train.optimizers import FusedOptimizer, FusedState

HEAD = ("final_norm", "score", "lm_head")


def train_step(
    graphdef: nnx.GraphDef,
    config: Config,
    optimizer: FusedOptimizer,
    lr: jax.Array,
    state: Any,
    batch: dict,
) -> tuple[dict, FusedState, dict]:
    """(new parameters, new optimizer state, metrics) of one step; `state` is the TrainState
    (every parameter trainable)."""
    params, frozen, opt_state = state.trainable, state.frozen, state.opt_state
    model = nnx.merge(graphdef, params, frozen)
    totals = losses.totals(batch)
    micro = jax.tree.map(lambda x: split_rows(x, config.train.micro_batches), batch)
    span, limit = losses.attention_span(config.data), batch["tokens"].shape[1]

    def layer_of(mb: dict) -> Callable[[jax.Array, dict], jax.Array]:
        attend = model.packed_attention(mb["segment_ids"], mb.get("prefix_ids"), span)
        layer = model.layer_function(mb["positions"], attend, limit)
        return lambda h, layer_params: layer(h, layer_params, None)[0]

    def forward(mb: dict) -> tuple[jax.Array, jax.Array]:
        layer = layer_of(mb)
        step = lambda h, layer_params: (layer(h, layer_params), h)  # noqa: E731
        last, inputs = jax.lax.scan(step, model.embed_tokens(mb["tokens"]), params["layers"])
        return constrain(inputs, (None, *HIDDEN)), last

    inputs, last = jax.lax.map(forward, micro)  # [parts, layers, rows, ...], [parts, rows, ...]

    tied = config.model.lm_head and config.model.tie_embeddings
    head = pick(params, (*HEAD, "embed") if tied else HEAD)  # what the objective reads

    def head_objective(head: dict, h: jax.Array, mb: dict) -> tuple[jax.Array, dict]:
        with_head = nnx.merge(graphdef, {**params, **head}, frozen)
        return losses.objective(with_head, mb, config, totals, with_head.final_norm(h))

    head_grad = jax.value_and_grad(head_objective, argnums=(0, 1), has_aux=True)

    def head_part(args: tuple) -> tuple[tuple[dict, dict], jax.Array]:
        (_, sums), (grads, d_last) = head_grad(head, *args)
        return (grads, sums), d_last

    (head_grads, sums), d_last = scan_sum(head_part, (last, micro))
    finite = all_finite(sums)

    def embed_grads(d_first: jax.Array) -> dict:
        def one(args: tuple) -> tuple[jax.Array, None]:
            d, mb = args

            def embed(table: jax.Array) -> jax.Array:
                with_table = nnx.merge(graphdef, {**params, "embed": table}, frozen)
                return with_table.embed_tokens(mb["tokens"])

            return jax.vjp(embed, params["embed"])[1](d)[0], None

        grad = scan_sum(one, (d_first, micro))[0]
        return grad + head_grads["embed"] if "embed" in head_grads else grad

    def walk(update: Callable | None) -> tuple:
        """Back through the layers: (layers, their moments, d first hidden, squared-gradient sum,
        groups not updated). `update(grads, params, moments) -> (params, moments, ok)`."""

        def body(carry: tuple, i: jax.Array) -> tuple[tuple, None]:
            layers, moments, d_h, squares, skipped = carry
            layer_params = jax.tree.map(lambda x: x[i], layers)

            def one(args: tuple) -> tuple[dict, jax.Array]:
                h, d, mb = args
                d_in, grads = jax.vjp(layer_of(mb), h, layer_params)[1](d)
                return grads, constrain(d_in, HIDDEN)

            grads, d_h = scan_sum(one, (inputs[:, i], d_h, micro))
            squares += sum_of_squares(grads)
            if update is not None:
                layer_moments = jax.tree.map(lambda x: x[i], moments)
                new, new_moments, ok = update(grads, layer_params, layer_moments)
                put = lambda stack, x: stack.at[i].set(x)  # noqa: E731
                layers = jax.tree.map(put, layers, new)
                moments = jax.tree.map(put, moments, new_moments)
                skipped += ~ok
            return (layers, moments, d_h, squares, skipped), None

        layer_moments = opt_state.second.get("layers", {})
        start = (params["layers"], layer_moments, d_last, jnp.zeros([]), jnp.zeros([], jnp.int32))
        steps = jnp.arange(config.model.num_layers)
        return jax.lax.scan(body, start, steps, reverse=True)[0]

    head_squares = sum_of_squares(pick(head_grads, HEAD))
    coef = jnp.ones([])
    if config.optimizer.grad_clip:
        *_, d_first, layer_squares, _ = walk(None)
        norm = jnp.sqrt(head_squares + layer_squares + sum_of_squares(embed_grads(d_first)))
        finite &= jnp.isfinite(norm)
        coef = jnp.minimum(1.0, config.optimizer.grad_clip / (norm + 1e-6))

    t = opt_state.count + 1

    def update(grads: dict, group: dict, moments: dict) -> tuple[dict, dict, jax.Array]:
        ok = finite & all_finite(grads)
        new, new_moments = update_group(optimizer, grads, group, moments, lr, t, coef)
        keep = lambda a, b: jnp.where(ok, a, b)  # noqa: E731
        return jax.tree.map(keep, new, group), jax.tree.map(keep, new_moments, moments), ok

    second = opt_state.second
    new_head, head_moments, head_ok = update(
        pick(head_grads, HEAD), pick(params, HEAD), pick(second, HEAD)
    )
    layers, layer_moments, d_first, layer_squares, skipped = walk(update)
    grads = embed_grads(d_first)
    new_embed, embed_moments, embed_ok = update(
        {"embed": grads}, pick(params, ["embed"]), pick(second, ["embed"])
    )
    if not config.optimizer.grad_clip:
        norm = jnp.sqrt(head_squares + layer_squares + sum_of_squares(grads))
    new_params = {**params, **new_head, **new_embed, "layers": layers}
    new_second = {**second, **head_moments, **embed_moments}
    if second:
        new_second["layers"] = layer_moments
    nonfinite = ~(finite & head_ok & embed_ok) | (skipped > 0)
    count = jnp.where(finite, t, opt_state.count)
    metrics = {**sums, "grad_norm": norm, "nonfinite": nonfinite.astype(jnp.int32)}
    return new_params, FusedState(count, new_second), metrics


def update_group(
    optimizer: FusedOptimizer,
    grads: dict,
    params: dict,
    moments: dict,
    lr: jax.Array,
    t: jax.Array,
    coef: jax.Array,
) -> tuple[dict, dict]:
    """Applies the optimizer's rule to every parameter of a (nested) dict."""
    new, new_moments = {}, {}
    for key, param in params.items():
        if isinstance(param, dict):
            new[key], inner = update_group(
                optimizer, grads[key], param, moments.get(key, {}), lr, t, coef
            )
        else:
            new[key], inner = optimizer.update(
                key, grads[key] * coef, param, moments.get(key, {}), lr, t
            )
        if inner:
            new_moments[key] = inner
    return new, new_moments


def pick(tree: dict, keys: Any) -> dict:
    return {key: tree[key] for key in keys if key in tree}


def scan_sum(fn: Callable[[Any], tuple[Any, Any]], xs: Any) -> tuple[Any, Any]:
    """`fn(x) -> (summed, stacked)` over the leading axis of `xs`: (sum of the first parts,
    the second parts stacked)."""
    first = jax.tree.map(lambda x: x[0], xs)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first)[0])

    def body(total: Any, x: Any) -> tuple[Any, Any]:
        summed, stacked = fn(x)
        return jax.tree.map(jnp.add, total, summed), stacked

    return jax.lax.scan(body, zeros, xs)


def sum_of_squares(tree: Any) -> jax.Array:
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)), 0.0)


def all_finite(tree: Any) -> jax.Array:
    """Leaf by leaf (a norm could overflow where every entry is finite)."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
