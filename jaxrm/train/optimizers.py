"""Optimizers and learning-rate schedules (optax), as the config names them.

    optimizer = make_optimizer(config.optimizer, total_steps=config.train.steps)
    updates, state = optimizer.update(grads, state, params, obj_fn=loss_of_params)

Schedules: `warmup_cosine` is POLAR's recipe (linear warm-up over `warmup_ratio` of the steps,
then cosine to `min_lr_ratio * lr`); `wsd` is CodePMP's warmup-stable-decay (warm-up, constant,
then the last `decay_ratio` of the steps linearly to 0). Weight decay never touches norm scales
or biases. Gradients are clipped to `grad_clip` global norm before the optimizer sees them.
Sophia (optax.contrib) estimates the Hessian diagonal with Hutchinson's method and so needs the
loss as a function of the parameters: every update passes it as `obj_fn`.
"""

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
