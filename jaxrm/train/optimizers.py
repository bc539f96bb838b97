"""Optimizers and learning-rate schedules (optax), as the config names them.

    optimizer = make_optimizer(config.optimizer, total_steps=config.train.steps)
    updates, state = optimizer.update(grads, state, params, obj_fn=loss_of_params)

Schedules: `warmup_cosine` is POLAR's recipe (linear warm-up over `warmup_ratio` of the steps,
then cosine to `min_lr_ratio * lr`); `wsd` is CodePMP's warmup-stable-decay (warm-up, constant,
then the last `decay_ratio` of the steps linearly to 0). Weight decay never touches norm scales
or biases. Gradients are clipped to `grad_clip` global norm before the optimizer sees them.
Sophia (optax.contrib) estimates the Hessian diagonal with Hutchinson's method and so needs the
loss as a function of the parameters: every update passes it as `obj_fn`.

LOMO and AdaLomo (`FusedOptimizer`) are not optax transforms: `train/fused.py` applies their
update to each layer while the backward pass walks back through the stack, so the model's
gradients never exist at once. Their update rules are here, one parameter at a time.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from jaxrm.config import OptimizerConfig

NO_DECAY = ("scale", "bq", "bk", "bv")  # RMSNorm scales and q/k/v biases


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    lr = config.lr
    warmup = round(config.warmup_ratio * total_steps)
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=lr * config.min_lr_ratio,
        )
    decay = round(config.decay_ratio * total_steps)
    stable = total_steps - warmup - decay
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, warmup),
            optax.constant_schedule(lr),
            optax.linear_schedule(lr, 0.0, decay),
        ],
        boundaries=[warmup, warmup + stable],
    )


def decay_mask(params: dict) -> dict:
    """True for the parameters weight decay applies to: all but norm scales and biases."""
    return {
        key: decay_mask(value) if isinstance(value, dict) else key not in NO_DECAY
        for key, value in params.items()
    }


def make_optimizer(
    config: OptimizerConfig, total_steps: int
) -> optax.GradientTransformationExtraArgs:
    lr = learning_rate_schedule(config, total_steps)
    wd = config.weight_decay

    def betas(b1: float, b2: float) -> dict[str, float]:
        return {
            "b1": b1 if config.b1 is None else config.b1,
            "b2": b2 if config.b2 is None else config.b2,
        }

    if config.name == "adamw":
        optimizer = optax.adamw(lr, **betas(0.9, 0.999), weight_decay=wd, mask=decay_mask)
    elif config.name == "lion":
        optimizer = optax.lion(lr, **betas(0.9, 0.99), weight_decay=wd, mask=decay_mask)
    elif config.name == "adan":
        optimizer = optax.adan(lr, **betas(0.98, 0.92), weight_decay=wd, mask=decay_mask)
    elif config.name == "adafactor":
        factored = optax.adafactor(
            lr, momentum=config.b1, decay_rate=0.8 if config.b2 is None else config.b2
        )
        optimizer = optax.chain(factored, decoupled_weight_decay(lr, wd))
    else:
        optimizer = contrib.sophia(
            lr, **betas(0.965, 0.99), weight_decay=wd, weight_decay_mask=decay_mask
        )
    clip = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    return optax.with_extra_args_support(optax.chain(*clip, optimizer))


def decoupled_weight_decay(lr: optax.Schedule, rate: float) -> optax.GradientTransformation:
    """Subtracts lr(step) * rate * param, as AdamW does; optax's Adafactor decays by `rate` per
    step regardless of the learning rate, which would make the key mean something else."""

    def init(params: dict) -> optax.ScaleByScheduleState:
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(
        updates: dict, state: optax.ScaleByScheduleState, params: dict
    ) -> tuple[dict, optax.ScaleByScheduleState]:
        step_rate = lr(state.count) * rate
        decayed = jax.tree.map(
            lambda u, p, decay: u - step_rate * p if decay else u,
            updates,
            params,
            decay_mask(params),
        )
        return decayed, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


ADALOMO_EPS = (1e-30, 1e-3)  # added to squared gradients; the floor of a parameter's RMS
ADALOMO_CLIP = 1.0  # an update's RMS is normalised down to at most this
MATRIX_IN_DIMS = {"wo": 2}  # input axes of a kernel (heads, head_dim for wo); others have one


class FusedState(NamedTuple):
    count: jax.Array  # updates applied so far
    second: dict  # AdaLomo's second-moment statistics, keyed like the parameters ({} for LOMO)


def matrix_view(name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(inputs, outputs) of the matrix a parameter is in a torch Linear / Embedding, None for
    a vector (norm scales, biases). AdaLomo factors the second moments of matrices only."""
    if name in NO_DECAY or len(shape) < 2:
        return None
    split = MATRIX_IN_DIMS.get(name, 1)
    return math.prod(shape[:split]), math.prod(shape[split:])


@dataclasses.dataclass(frozen=True)
class FusedOptimizer:
    """LOMO (SGD) or AdaLomo, one parameter (one layer's slice of it) at a time.

    LOMO: p <- p * (1 - lr * weight_decay) - lr * g.
    AdaLomo (arXiv 2310.10195, as OpenLMLab's reference code computes it): with t the update's
    number (1, 2, ...) and beta = 1 - t^-decay (`optimizer.b2`, default 0.8; beta = 0 at t = 1),
    - a matrix keeps row and column means of g^2 + 1e-30, r <- beta r + (1 - beta) rowmean,
      c <- beta c + (1 - beta) colmean, and v = r c^T / mean(r) (Adafactor's factored moment);
      a vector keeps v <- beta v + (1 - beta) (g^2 + 1e-30);
    - u = g / sqrt(v), normalised per parameter (grouped update normalisation):
      u <- u / max(1, RMS(u));
    - the step is relative to the parameter: p <- p * (1 - s * weight_decay) - s * u with
      s = lr * max(1e-3, RMS(p)).
    Weight decay skips norm scales and biases, as every jaxrm optimizer does (the reference
    decays them too). `g` has already been scaled by the clipping coefficient.
    """

    name: str
    weight_decay: float
    decay_rate: float

    def init(self, params: dict) -> FusedState:
        second = {}
        if self.name == "adalomo":
            second = _map_named(self._second_moments, params)
        return FusedState(jnp.zeros([], jnp.int32), second)

    def _second_moments(self, name: str, param: jax.Array, stacked: bool) -> dict:
        shape = param.shape[1:] if stacked else param.shape
        lead = param.shape[:1] if stacked else ()
        view = matrix_view(name, shape)
        if view is None:
            return {"v": jnp.zeros(param.shape, jnp.float32)}
        return {
            "row": jnp.zeros((*lead, view[0]), jnp.float32),
            "col": jnp.zeros((*lead, view[1]), jnp.float32),
        }

    def update(
        self,
        name: str,
        grad: jax.Array,
        param: jax.Array,
        second: dict,
        lr: jax.Array,
        t: jax.Array,
    ) -> tuple[jax.Array, dict]:
        """(new parameter, its new second moments) for one parameter; `t` counts from 1."""
        g, p = grad.astype(jnp.float32), param.astype(jnp.float32)
        decays = name not in NO_DECAY
        if self.name == "lomo":
            if decays:
                p = p * (1 - lr * self.weight_decay)
            return (p - lr * g).astype(param.dtype), second
        beta = 1 - t.astype(jnp.float32) ** -self.decay_rate
        squared = g * g + ADALOMO_EPS[0]
        view = matrix_view(name, g.shape)
        if view is None:
            v = beta * second["v"] + (1 - beta) * squared
            u, second = g * jax.lax.rsqrt(v), {"v": v}
        else:
            squared = squared.reshape(view)
            row = beta * second["row"] + (1 - beta) * squared.mean(axis=1)
            col = beta * second["col"] + (1 - beta) * squared.mean(axis=0)
            factor = jax.lax.rsqrt(row / row.mean())[:, None] * jax.lax.rsqrt(col)[None, :]
            u, second = (g.reshape(view) * factor).reshape(g.shape), {"row": row, "col": col}
        u = u / jnp.maximum(1.0, _rms(u) / ADALOMO_CLIP)
        step = lr * jnp.maximum(ADALOMO_EPS[1], _rms(p))
        if decays:
            p = p * (1 - step * self.weight_decay)
        return (p - step * u).astype(param.dtype), second


def make_fused_optimizer(config: OptimizerConfig) -> FusedOptimizer:
    decay_rate = 0.8 if config.b2 is None else config.b2
    return FusedOptimizer(config.name, config.weight_decay, decay_rate)


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(x * x))


def _map_named(
    fn: Callable[[str, jax.Array, bool], dict], params: dict, stacked: bool = False
) -> dict:
    """fn(leaf name, leaf, stacked) over a parameter dict; `stacked` below `layers`."""
    return {
        key: _map_named(fn, value, stacked or key == "layers")
        if isinstance(value, dict)
        else fn(key, value, stacked)
        for key, value in params.items()
    }
