"""LOMO and AdaLomo (`optimizer.name: lomo | adalomo`): the update fused into the backward pass
equals a hand-written update of the whole gradient, shards and accumulates exactly, and trains."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrm.config import load_config
from jaxrm.model.decoder import create_model
from jaxrm.sharding import make_mesh
from jaxrm.train import losses
from jaxrm.train.trainer import Trainer

VECTORS = ("scale", "bq", "bk", "bv")
DECAY, LR = 0.1, 0.01


def four_row_batch():
    """Four rows of one (chosen, rejected) pair each, LM targets on the chosen responses."""
    tokens = np.array(
        [
            [3, 7, 9, 5, 3, 8, 5, 0],
            [3, 10, 5, 3, 11, 12, 5, 0],
            [4, 9, 9, 5, 4, 9, 13, 5],
            [6, 5, 6, 14, 5, 0, 0, 0],
        ],
        np.int32,
    )
    segments = np.array(
        [
            [1, 1, 1, 1, 2, 2, 2, 0],
            [1, 1, 1, 2, 2, 2, 2, 0],
            [1, 1, 1, 1, 2, 2, 2, 2],
            [1, 1, 2, 2, 2, 0, 0, 0],
        ],
        np.int32,
    )
    positions = np.array(
        [
            [0, 1, 2, 3, 0, 1, 2, 0],
            [0, 1, 2, 0, 1, 2, 3, 0],
            [0, 1, 2, 3, 0, 1, 2, 3],
            [0, 1, 0, 1, 2, 0, 0, 0],
        ],
        np.int32,
    )
    return {
        "tokens": tokens,
        "segment_ids": segments,
        "positions": positions,
        "prefix_ids": np.zeros_like(tokens),
        "reward_index": np.array([[[3, 6]], [[2, 6]], [[3, 7]], [[1, 4]]], np.int32),
        "margin": np.zeros((4, 1), np.float32),
        "bad_rows": np.zeros((4,), np.int32),
        "lm_weights": (segments == 1).astype(np.float32),
    }


def make_config(name, *extra):
    return load_config(
        None,
        [
            "model.dtype=float32",
            "objective=codepmp",
            "model.lm_head=true",
            "model.tie_embeddings=true",  # the embedding's gradient has two sources
            "train.batch_size=4",
            f"optimizer.name={name}",
            f"optimizer.lr={LR}",
            "optimizer.schedule=constant",
            f"optimizer.weight_decay={DECAY}",
            *extra,
        ],
    )


def whole_gradient(trainer):
    """The plain autodiff gradient of the whole batch's loss (no fused walk)."""

    def loss(params, batch):
        model = nnx.merge(trainer.graphdef, params, {})
        return losses.objective(model, batch, trainer.config, losses.totals(batch))[0]

    return jax.jit(jax.grad(loss))


def reference_update(name, grads, params, moments, t, clip):
    """LOMO / AdaLomo by hand in float64 on every parameter (each layer's slice on its own)."""
    norm = math.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
    coef = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
    out = {}
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(k.key for k in path)
        g = np.asarray(grads_at(grads, keys), np.float64) * coef
        p = np.asarray(p, np.float64)
        stacked = keys[0] == "layers"
        slices = [(i,) for i in range(p.shape[0])] if stacked else [()]
        new = np.empty_like(p)
        for s in slices:
            new[s] = one_parameter(name, keys[-1], g[s], p[s], moments, keys + s, t)
        out[keys] = new
    return out


def one_parameter(name, leaf, g, p, moments, key, t):
    decays = leaf not in VECTORS
    if name == "lomo":
        return p * (1 - LR * DECAY if decays else 1) - LR * g
    beta = 1 - t**-0.8
    sq = g * g + 1e-30
    if leaf in VECTORS or g.ndim < 2:
        v = beta * moments.get(key, 0.0) + (1 - beta) * sq
        moments[key] = v
        u = g / np.sqrt(v)
    else:
        split = 2 if leaf == "wo" else 1
        rows, cols = math.prod(g.shape[:split]), math.prod(g.shape[split:])
        sq = sq.reshape(rows, cols)
        r = beta * moments.get((*key, "r"), 0.0) + (1 - beta) * sq.mean(axis=1)
        c = beta * moments.get((*key, "c"), 0.0) + (1 - beta) * sq.mean(axis=0)
        moments[(*key, "r")], moments[(*key, "c")] = r, c
        v = np.outer(r, c) / r.mean()
        u = (g.reshape(rows, cols) / np.sqrt(v)).reshape(g.shape)
    u = u / max(1.0, np.sqrt(np.mean(u * u)))
    step = LR * max(1e-3, np.sqrt(np.mean(p * p)))
    return p * (1 - step * DECAY if decays else 1) - step * u


def grads_at(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


def as_tree(flat, like):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: np.asarray(flat[tuple(k.key for k in path)]), like
    )


def max_difference(a, b):
    return max(
        float(np.max(np.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize(
    "name, mesh, extra",
    [
        ("lomo", (1, 1, 1, 1), ["optimizer.grad_clip=1.0"]),  # the norm is ~3.6: clipping acts
        ("adalomo", (1, 2, 2, 2), ["optimizer.grad_clip=null", "mesh.context=2"]),
        ("adalomo", (1, 2, 2, 1), ["optimizer.grad_clip=1.0", "train.micro_batches=2"]),
    ],
)
def test_two_fused_steps_equal_the_hand_written_update(name, mesh, extra):
    """One device; FSDP x tensor x context on eight devices; micro-batches on four."""
    config = make_config(name, *extra)
    data, fsdp, tensor, context = mesh
    devices = jax.devices()[: math.prod(mesh)]
    mesh = make_mesh(data, fsdp, tensor, devices=devices, context=context)
    trainer = Trainer(config, mesh)
    state = trainer.init_state(create_model(config.model, 0, mesh, config.mesh.rules))
    batch = trainer.global_batch(four_row_batch())
    expected, moments, gradient = jax.device_get(state.trainable), {}, whole_gradient(trainer)
    for step in range(2):
        grads = jax.device_get(gradient(as_tree_f32(expected), batch))
        expected = as_tree(
            reference_update(name, grads, expected, moments, step + 1, config.optimizer.grad_clip),
            expected,
        )
        state, metrics = trainer.step(state, batch, step)
        assert int(metrics["nonfinite"]) == 0
        norm = math.sqrt(
            sum(float(np.sum(g.astype(np.float64) ** 2)) for g in jax.tree.leaves(grads))
        )
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
        assert max_difference(jax.device_get(state.trainable), expected) < 1e-6
    assert int(state.opt_state.count) == 2


def as_tree_f32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
