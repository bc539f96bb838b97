"""Losses against their formulas, optimizers and schedules against their recipes, LoRA against
the merged model it exports."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm.config import load_config
from jaxrm.hf.convert import export_hf, load_hf
from jaxrm.model.decoder import Loaded, create_model, merge_lora
from jaxrm.sharding import make_mesh
from jaxrm.train import losses
from jaxrm.train.optimizers import decay_mask, learning_rate_schedule, make_optimizer
from jaxrm.train.trainer import Trainer


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_plackett_luce_of_a_pair_is_bradley_terry_with_margin():
    rewards = jnp.array([[1.5, -0.25]])
    valid = jnp.ones((1, 2), bool)
    loss = losses.plackett_luce(rewards, valid, jnp.array([0.5]))
    np.testing.assert_allclose(loss, [-log_sigmoid(1.5 - 0.5 + 0.25)], rtol=1e-6)


def test_plackett_luce_of_a_ranked_list_against_its_formula():
    r = [2.0, 0.5, -1.0, 9.0]  # the last response is missing (-1 index) and must not count
    valid = jnp.array([[True, True, True, False]])
    loss = losses.plackett_luce(jnp.array([r]), valid, jnp.zeros(1))
    expected = -(
        r[0]
        - math.log(sum(math.exp(x) for x in r[:3]))
        + r[1]
        - math.log(sum(map(math.exp, r[1:3])))
    )
    np.testing.assert_allclose(loss, [expected], rtol=1e-6)


class FixedRewards:
    """A stand-in model whose reward at token t is `scores[row, t]` (and no LM head)."""

    def __init__(self, scores):
        self.scores = jnp.asarray(scores, jnp.float32)

    def __call__(self, tokens, segment_ids, positions, prefix_ids=None, span=None):
        return self.scores[..., None]

    def token_rewards(self, hidden):
        return hidden[..., 0]


def test_objective_centering_accuracy_and_statistics():
    scores = np.array([[0.0, 1.0, 3.0, 2.0, 0.0, 0.5]])
    batch = {
        "tokens": jnp.zeros((1, 6), jnp.int32),
        "segment_ids": jnp.ones((1, 6), jnp.int32),
        "positions": jnp.zeros((1, 6), jnp.int32),
        # example 1: (3.0 > 1.0) right; example 2: (0.0 < 0.5) wrong; slot 3 unused
        "reward_index": jnp.array([[[2, 1], [4, 5], [-1, -1]]]),
        "margin": jnp.zeros((1, 3)),
    }
    config = load_config(None, ["loss.center_rewards=0.01"])
    loss, sums = losses.objective(FixedRewards(scores), batch, config, losses.totals(batch))
    bt = [-log_sigmoid(3.0 - 1.0), -log_sigmoid(0.0 - 0.5)]
    centering = 0.01 * ((3.0 + 1.0) ** 2 + (0.0 + 0.5) ** 2) / 2
    np.testing.assert_allclose(loss, sum(bt) / 2 + centering, rtol=1e-6)
    metrics = losses.summarize(jax.device_get(sums), config.loss)
    np.testing.assert_allclose(metrics["loss"], float(loss), rtol=1e-6)
    assert metrics["accuracy"] == 0.5
    np.testing.assert_allclose(metrics["reward_mean"], np.mean([3.0, 1.0, 0.0, 0.5]))
    np.testing.assert_allclose(metrics["reward_std"], np.std([3.0, 1.0, 0.0, 0.5]), rtol=1e-6)
    np.testing.assert_allclose(metrics["margin"], ((3.0 - 1.0) + (0.0 - 0.5)) / 2)


def test_tied_rewards_count_as_wrong():
    batch = {
        "tokens": jnp.zeros((1, 2), jnp.int32),
        "segment_ids": jnp.ones((1, 2), jnp.int32),
        "positions": jnp.zeros((1, 2), jnp.int32),
        "reward_index": jnp.array([[[0, 1]]]),
        "margin": jnp.zeros((1, 1)),
    }
    config = load_config(None, [])
    _, sums = losses.objective(FixedRewards([[1.0, 1.0]]), batch, config, losses.totals(batch))
    assert float(sums["correct"]) == 0


def test_next_token_loss_is_cross_entropy_on_weighted_positions():
    config = load_config(None, ["model.lm_head=true", "model.dtype=float32"]).model
    model = create_model(config, seed=0)
    tokens = jnp.array([[5, 9, 11, 13, 0]])
    weights = jnp.array([[0.0, 1.0, 1.0, 0.0, 0.0]])  # predict tokens 11 and 13
    segments = jnp.array([[1, 1, 1, 1, 0]])
    hidden = model(tokens, segments, jnp.array([[0, 1, 2, 3, 0]]))
    logits = np.asarray(model.lm_logits(hidden))[0]
    expected = sum(-jax.nn.log_softmax(logits[p])[tokens[0, p + 1]] for p in (1, 2))
    total = losses.next_token_loss(model, hidden, tokens, weights)
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_schedules_follow_the_polar_and_codepmp_recipes():
    cosine = load_config(None, ["optimizer.lr=1.0"]).optimizer  # warmup_cosine, 3%, to 0.1
    f = learning_rate_schedule(cosine, 1000)
    assert float(f(0)) == 0.0
    np.testing.assert_allclose([f(15), f(30), f(1000)], [0.5, 1.0, 0.1], rtol=1e-5)
    wsd = load_config(None, ["optimizer.lr=1.0", "optimizer.schedule=wsd"]).optimizer
    g = learning_rate_schedule(wsd, 1000)
    np.testing.assert_allclose(
        [g(30), g(500), g(900), g(950), g(1000)], [1, 1, 1, 0.5, 0], atol=1e-6
    )


def test_weight_decay_skips_norms_and_biases():
    config = load_config(None, ["model.qkv_bias=true"]).model
    params = nnx.to_pure_dict(nnx.state(create_model(config), nnx.Param))
    mask = decay_mask(params)
    assert mask["embed"] and mask["layers"]["attention"]["wq"] and mask["layers"]["mlp"]["down"]
    assert not mask["layers"]["attention"]["bq"] and not mask["final_norm"]["scale"]
    assert not mask["layers"]["attention_norm"]["scale"]


@pytest.mark.parametrize("name", ["adamw", "lion", "adan", "adafactor", "sophia"])
def test_every_optimizer_lowers_a_quadratic(name):
    config = load_config(
        None, [f"optimizer.name={name}", "optimizer.lr=0.05", "optimizer.schedule=constant"]
    ).optimizer
    optimizer = make_optimizer(config, total_steps=50)
    params = {"w": jnp.full((4, 4), 2.0)}

    def objective(p):
        return jnp.sum(p["w"] ** 2)

    state = optimizer.init(params)
    for _ in range(20):
        grads = jax.grad(objective)(params)
        updates, state = optimizer.update(grads, state, params, obj_fn=objective)
        params = jax.tree.map(jnp.add, params, updates)
    assert float(objective(params)) < 0.9 * 64.0


def lora_config(*extra):
    return load_config(None, ["model.dtype=float32", "model.lora_rank=4", *extra])


def pair_batch():
    tokens = jnp.array([[3, 7, 9, 5, 3, 8, 5, 0], [3, 10, 5, 3, 11, 12, 5, 0]], jnp.int32)
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 2, 2, 2, 0]], jnp.int32)
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 3, 0]], jnp.int32)
    return {
        "tokens": tokens,
        "segment_ids": segments,
        "positions": positions,
        "prefix_ids": jnp.zeros_like(tokens),
        "reward_index": jnp.array([[[3, 6]], [[2, 6]]], jnp.int32),
        "margin": jnp.zeros((2, 1)),
        "bad_rows": jnp.zeros((2,), jnp.int32),
    }


def test_lora_trains_only_adapters_and_the_reward_head():
    config = lora_config("optimizer.lr=0.01", "optimizer.schedule=constant")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = Trainer(config, mesh)
    before = trainer.init_state(create_model(config.model, 0, mesh, config.mesh.rules))
    params_before = jax.device_get(trainer.params(before))
    after, _ = trainer.step(before, trainer.global_batch(jax.device_get(pair_batch())), 0)
    params_after = jax.device_get(trainer.params(after))
    flat_before = dict(jax.tree_util.tree_leaves_with_path(params_before))
    changed = {
        "/".join(str(k.key) for k in path)
        for path, value in jax.tree_util.tree_leaves_with_path(params_after)
        if not np.array_equal(value, flat_before[path])
    }
    assert "score" in changed and "layers/attention/wq_lora_b" in changed
    assert all("lora" in name or name == "score" for name in changed), changed


def test_export_folds_lora_adapters_into_the_kernels(tmp_path):
    config = lora_config()
    model = create_model(config.model, seed=0)
    state = nnx.state(model, nnx.LoRAParam)  # B starts at zero: give the adapters some effect
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), state))
    batch = pair_batch()
    expected = losses.ranked_rewards(model, batch)[1]

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    plain_config = load_config(None, ["model.dtype=float32"])
    plain = create_model(plain_config.model, seed=1)
    nnx.update(plain, merge_lora(params, config.model))
    np.testing.assert_allclose(losses.ranked_rewards(plain, batch)[1], expected, atol=1e-5)

    export_hf(Loaded(model, config, None), tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf", overrides=["model.dtype=float32"])
    assert loaded.config.model.lora_rank == 0
    np.testing.assert_allclose(losses.ranked_rewards(loaded.model, batch)[1], expected, atol=1e-5)
