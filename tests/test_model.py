import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.config import load_config
from jaxrm.model.decoder import (
    count_params,
    create_model,
    last_token_index,
    rewards_at,
    rope_inverse_frequencies,
    rope_rotation,
)
from jaxrm.presets import PRESETS


def tiny(*overrides):
    return load_config(None, ["model.dtype=float32", *overrides]).model


def score(model, tokens, segment_ids, positions, num_segments):
    hidden = model(tokens, segment_ids, positions)
    index = last_token_index(segment_ids, num_segments)
    return rewards_at(model.token_rewards(hidden), index)


@pytest.mark.parametrize("overrides", [[], ["model.qkv_bias=true", "model.tie_embeddings=true"]])
def test_packed_row_rewards_equal_each_sequence_alone(overrides):
    model = create_model(tiny(*overrides), seed=0)
    rng = np.random.default_rng(0)
    lengths, row_len = [7, 3, 11], 24
    sequences = [rng.integers(1, 1024, n) for n in lengths]

    packed = np.zeros((3, row_len), np.int32)  # tokens, segment ids, positions
    start = 0
    for seg, seq in enumerate(sequences, 1):
        packed[:, start : start + len(seq)] = [seq, [seg] * len(seq), np.arange(len(seq))]
        start += len(seq)
    packed_rewards = score(model, *(jnp.asarray(a)[None] for a in packed), num_segments=3)[0]

    for seg, seq in enumerate(sequences):
        alone = np.zeros((3, row_len), np.int32)
        alone[:, : len(seq)] = [seq, np.ones(len(seq)), np.arange(len(seq))]
        reward = score(model, *(jnp.asarray(a)[None] for a in alone), num_segments=1)[0, 0]
        np.testing.assert_allclose(packed_rewards[seg], reward, atol=1e-5, rtol=0)
    assert len(set(np.round(np.asarray(packed_rewards), 6))) == 3


def test_last_token_index_marks_missing_segments():
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(last_token_index(segment_ids, 3), [[1, 4, -1], [5, -1, -1]])


@pytest.mark.parametrize("preset", [p for p in PRESETS if "published_params" in PRESETS[p]])
def test_preset_parameter_count_matches_published_size(preset):
    config = load_config(None, [f"model.preset={preset}", "model.lm_head=true"]).model
    count = count_params(config)
    assert abs(count / PRESETS[preset]["published_params"] - 1) < 0.005


def test_lm_head_is_tied_to_embeddings_when_asked():
    untied = create_model(tiny("model.lm_head=true"))
    tied = create_model(tiny("model.lm_head=true", "model.tie_embeddings=true"))
    assert untied.lm_head is not None and tied.lm_head is None
    assert (
        count_params(tiny("model.lm_head=true"))
        - count_params(tiny("model.lm_head=true", "model.tie_embeddings=true"))
        == 1024 * 64
    )
    tokens = jnp.array([[3, 4, 5]])
    segments, positions = jnp.ones_like(tokens), jnp.arange(3)[None]
    logits = tied.lm_logits(tied(tokens, segments, positions))
    assert logits.shape == (1, 3, 1024) and logits.dtype == jnp.float32


def test_zero_head_gives_zero_rewards():
    model = create_model(tiny("model.reward_head_init=zero"))
    tokens = jnp.array([[3, 4, 5]])
    hidden = model(tokens, jnp.ones_like(tokens), jnp.arange(3)[None])
    assert not np.any(np.asarray(model.token_rewards(hidden)))


def test_bfloat16_compute_keeps_float32_params_and_is_close_to_float32():
    tokens = jnp.array([[3, 4, 5, 6, 7]])
    segments, positions = jnp.ones_like(tokens), jnp.arange(5)[None]
    full = create_model(tiny())
    half = create_model(tiny("model.dtype=bfloat16"))
    assert half.embed[...].dtype == jnp.float32
    assert half(tokens, segments, positions).dtype == jnp.bfloat16
    r32 = full.token_rewards(full(tokens, segments, positions))
    r16 = half.token_rewards(half(tokens, segments, positions))
    np.testing.assert_allclose(r16, r32, atol=0.05)


def reward_gradients(config):
    from flax import nnx

    tokens = jnp.array([[3, 4, 5, 6, 7]])
    segments, positions = jnp.ones_like(tokens), jnp.arange(5)[None]
    model = create_model(config)
    loss = lambda m: jnp.sum(m.token_rewards(m(tokens, segments, positions)) ** 2)  # noqa: E731
    return jax.tree.leaves(nnx.grad(loss)(model))


@pytest.mark.parametrize(
    "override",
    [f"model.remat={policy}" for policy in ("full", "dots", "dots_no_batch")]
    + [f"model.layer_loop={loop}" for loop in ("scan", "unroll")],
)
def test_remat_policies_and_layer_loops_give_the_same_gradients(override):
    pairs = zip(reward_gradients(tiny()), reward_gradients(tiny(override)), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("loop", "training", "generating"),
    [("auto", True, False), ("scan", False, False), ("unroll", True, True)],
)
def test_layer_loop_unrolls_cpu_training_but_scans_a_kv_cache(loop, training, generating):
    model = create_model(tiny(f"model.layer_loop={loop}"))
    assert model._unroll(carried=None) is training  # the tests run on CPU
    assert model._unroll(carried=jnp.zeros((2, 1))) is generating


def test_rope_table_lookup_equals_computing_each_angle():
    inv_freq = jnp.asarray(rope_inverse_frequencies(tiny()))
    positions = jnp.asarray([[0, 1, 2, 3, 0, 1, 4, 5], [7, 6, 5, 4, 3, 2, 1, 0]])
    looked_up = rope_rotation(positions, inv_freq, limit=8)
    computed = rope_rotation(positions, inv_freq)
    for table, direct in zip(looked_up, computed, strict=True):
        np.testing.assert_array_equal(np.asarray(table), np.asarray(direct))


def test_rope_position_beyond_the_table_gives_nan_not_a_wrong_angle():
    inv_freq = jnp.asarray(rope_inverse_frequencies(tiny()))
    cos, sin = rope_rotation(jnp.asarray([[0, 1, 8]]), inv_freq, limit=8)
    assert np.isfinite(np.asarray(cos[0, :2])).all()
    assert np.isnan(np.asarray(cos[0, 2])).all() and np.isnan(np.asarray(sin[0, 2])).all()
