"""The compiled train and eval steps of one config on one mesh: the whole story of a step.

Each step takes a global batch of packed rows (every host contributes its rows, split over the
mesh's `data` and `fsdp` axes), splits it into `train.micro_batches` parts whose gradients are
summed, clips, and applies the optimizer. Losses are normalised by the whole batch's counts
(examples, LM tokens), so accumulating micro-batches gives the gradient of the whole batch.
With pipeline stages (`mesh.stage`) the micro-batches stream through the stages within one
forward instead (`model/pipeline.py`); LOMO and AdaLomo have their own step (`fused.py`).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrm.config import FUSED_OPTIMIZERS, Config
from jaxrm.errors import UserError
from jaxrm.model.decoder import RewardModel, abstract_model
from jaxrm.model.pipeline import pipelined_hidden
from jaxrm.sharding import (
    activation_sharding,
    batch_sharding,
    describe,
    local_rows,
    split_rows,
)
from jaxrm.train import fused, losses
from jaxrm.train.optimizers import learning_rate_schedule, make_fused_optimizer, make_optimizer


class TrainState(NamedTuple):
    trainable: dict  # parameters the optimizer updates (all, or LoRA adapters + reward head)
    frozen: dict  # the rest (empty without LoRA)
    opt_state: Any


def trainable_filter(config: Config) -> nnx.filterlib.Filter:
    if config.model.lora_rank:
        return nnx.Any(nnx.LoRAParam, nnx.PathContains("score"))
    return nnx.Param


class Trainer:
    """The compiled train and eval steps of one config on one mesh."""

    def __init__(self, config: Config, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        self.rules = config.mesh.rules
        self.stages = mesh.shape["stage"]
        self.fused = config.optimizer.name in FUSED_OPTIMIZERS
        if self.fused:
            self.optimizer = make_fused_optimizer(config.optimizer)
        else:
            self.optimizer = make_optimizer(config.optimizer, config.train.steps)
        self.schedule = learning_rate_schedule(config.optimizer, config.train.steps)
        self.full_graphdef, self.abstract_params = abstract_model(config.model, mesh, self.rules)
        abstract = nnx.merge(self.full_graphdef, self.abstract_params)
        self.graphdef, trainable, frozen = nnx.split(abstract, trainable_filter(config), ...)
        trainable, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
        opt_abstract = jax.eval_shape(self.optimizer.init, trainable)
        opt_shardings = self._opt_state_shardings(opt_abstract, trainable)
        opt_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            opt_abstract,
            opt_shardings,
        )
        self.abstract = TrainState(trainable, frozen, opt_state)
        self.shardings = TrainState(_shardings(trainable), _shardings(frozen), opt_shardings)
        self._step = None
        self._eval = None

    def _opt_state_shardings(self, opt_abstract: Any, trainable: dict) -> Any:
        """Moments shard like their parameters; anything else (counts, factored statistics of
        other shapes, keys) is replicated, as is all of a fused optimizer's small state."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        if self.fused:
            return jax.tree.map(lambda _: replicated, opt_abstract)
        return optax.tree_map_params(
            self.optimizer,
            lambda leaf, param: param.sharding if leaf.shape == param.shape else replicated,
            opt_abstract,
            trainable,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )

    def init_state(self, model: RewardModel) -> TrainState:
        _, trainable, frozen = nnx.split(model, trainable_filter(self.config), ...)
        trainable, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
        init = jax.jit(self.optimizer.init, out_shardings=self.shardings.opt_state)
        return TrainState(trainable, frozen, init(trainable))

    def model(self, state: TrainState) -> RewardModel:
        return nnx.merge(self.graphdef, state.trainable, state.frozen)

    def params(self, state: TrainState) -> dict:
        return nnx.to_pure_dict(nnx.state(self.model(state), nnx.Param))

    def split_params(self, params: dict) -> tuple[dict, dict]:
        _, trainable, frozen = nnx.split(
            nnx.merge(self.full_graphdef, params), trainable_filter(self.config), ...
        )
        return nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)

    @functools.cached_property
    def host_rows(self) -> range:
        """The rows of each global batch this host reads: those its devices hold. Hosts that
        split rows between them (`mesh.context` or `mesh.tensor` wider than a host) read the
        same ones."""
        held = sorted(local_rows(self.mesh, self.rules, self.config.train.batch_size))
        rows = range(held[0], held[-1] + 1)
        if len(held) != len(rows):
            raise UserError(
                f"mesh {describe(self.mesh.shape)} gives this host's devices rows "
                f"{held[0]}-{held[-1]} of each batch but not all of those in between; order the "
                "mesh axes so a host's devices hold one block of rows"
            )
        return rows

    def global_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows -> arrays over every host's rows, split over the batch mesh axes
        (a host gives `len(host_rows)` of every `train.batch_size` rows; given fewer, the whole
        batch shrinks alike)."""
        batch_size, held = self.config.train.batch_size, len(self.host_rows)
        out = {}
        for key, value in host_batch.items():
            shape = (value.shape[0] * batch_size // held, *value.shape[1:])
            sharding = batch_sharding(self.mesh, self.rules, shape)
            out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
        return out

    def compile(self, state: TrainState, batch: dict[str, jax.Array]) -> jax.stages.Compiled:
        """Compiles the train step for these shapes or abstract arrays (the first `step` does it
        otherwise)."""
        with activation_sharding(self.mesh, self.rules):
            self._step = (
                jax.jit(
                    self._train_step,
                    in_shardings=(self.shardings, None, None),
                    out_shardings=(self.shardings, None),
                    donate_argnums=(0,),
                )
                .lower(state, batch, jnp.int32(0))
                .compile()
            )
        return self._step

    def step(
        self, state: TrainState, batch: dict[str, jax.Array], step: int
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        if self._step is None:
            self.compile(state, batch)
        # TrainState is donated as a whole; the frozen part comes back unchanged.
        return self._step(state, batch, jnp.int32(step))

    def _loss(
        self, trainable: dict, frozen: dict, batch: dict, totals: dict
    ) -> tuple[jax.Array, dict]:
        model = nnx.merge(self.graphdef, trainable, frozen)
        hidden = None
        if self.stages > 1:  # the pipeline streams the micro-batches through its stages
            hidden = pipelined_hidden(
                model,
                batch["tokens"],
                batch["segment_ids"],
                batch["positions"],
                batch.get("prefix_ids"),
                losses.attention_span(self.config.data),
                self.stages,
                self.config.train.micro_batches,
            )
        return losses.objective(model, batch, self.config, totals, hidden)

    def _train_step(
        self, state: TrainState, batch: dict, step: jax.Array
    ) -> tuple[TrainState, dict]:
        if self.fused:
            lr = self.schedule(step)
            trainable, opt_state, metrics = fused.train_step(
                self.graphdef, self.config, self.optimizer, lr, state, batch
            )
            return TrainState(trainable, state.frozen, opt_state), {**metrics, "lr": lr}
        totals = losses.totals(batch)
        parts = 1 if self.stages > 1 else self.config.train.micro_batches
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def part(micro: dict) -> tuple[tuple[dict, dict], None]:
            (_, sums), grads = grad_fn(state.trainable, state.frozen, micro, totals)
            return (grads, sums), None

        micro_batches = jax.tree.map(lambda x: split_rows(x, parts), batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        if parts == 1:
            (grads, sums), _ = part(first)
        else:
            (grads, sums), _ = fused.scan_sum(part, micro_batches)

        def objective(trainable: dict) -> jax.Array:  # Sophia's Hessian estimate (one part)
            return self._loss(trainable, state.frozen, first, totals)[0]

        updates, opt_state = self.optimizer.update(
            grads, state.opt_state, state.trainable, obj_fn=objective
        )
        trainable = optax.apply_updates(state.trainable, updates)
        grad_norm = optax.tree.norm(grads)
        # A step whose loss, gradient or update is not finite is not applied: the state stays
        # as it was, and the loop stops the run at its next look at the metrics.
        finite = jnp.isfinite(grad_norm) & fused.all_finite((sums, updates))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        trainable = jax.tree.map(keep, trainable, state.trainable)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {**sums, "grad_norm": grad_norm, "lr": self.schedule(step)}
        metrics["nonfinite"] = (~finite).astype(jnp.int32)
        return TrainState(trainable, state.frozen, opt_state), metrics

    def evaluate(self, state: TrainState, batches: list[dict[str, np.ndarray]]) -> dict:
        """Metrics over all of `batches` (host batches), as one sum."""
        if self._eval is None:
            with activation_sharding(self.mesh, self.rules):
                self._eval = jax.jit(self._eval_step)
        totals: dict[str, float] = {}
        for host_batch in batches:
            sums = self._eval(state.trainable, state.frozen, self.global_batch(host_batch))
            for key, value in jax.device_get(sums).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return losses.summarize(totals, self.config.loss)

    def _eval_step(self, trainable: dict, frozen: dict, batch: dict) -> dict:
        return self._loss(trainable, frozen, batch, losses.totals(batch))[1]


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)
