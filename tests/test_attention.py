"""`model.attention`: the CPU flash kernel, XLA's einsums, splash (Pallas interpret mode on CPU)
and the cuDNN call path (through its XLA implementation) compute what a dense masked softmax
computes, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrm.model.attention
from jaxrm.config import load_config
from jaxrm.errors import UserError
from jaxrm.model.attention import (
    CPU_FLASH_ENV,
    INTERPRET_ENV,
    attention,
    attention_mask,
    cudnn_attention,
    splash_attention,
    xla_attention,
)
from jaxrm.model.decoder import create_model, last_token_index, rewards_at
from jaxrm.sharding import DEFAULT_RULES, activation_sharding, make_mesh

LENGTH = 200  # not a multiple of the kernel's 128-token blocks


def packed_segments(shared_prefix: bool) -> tuple[jax.Array, jax.Array | None]:
    """Rows of several segments, padding at the end; with a shared prefix, row 0 packs a prefix
    (segment 1) once and two candidates (segments 2 and 3) that continue it."""
    segments = np.zeros((3, LENGTH), np.int32)
    prefixes = np.zeros((3, LENGTH), np.int32)
    segments[0, :50], segments[0, 50:100], segments[0, 100:170], segments[0, 170:185] = 1, 2, 3, 4
    prefixes[0, 50:170] = 1 if shared_prefix else 0
    segments[1, :199] = 1
    segments[2, :60], segments[2, 60:130] = 1, 2
    return jnp.asarray(segments), jnp.asarray(prefixes) if shared_prefix else None


def qkv(
    heads: int = 4, kv_heads: int = 2, head_dim: int = 16, dtype=jnp.float32
) -> list[jax.Array]:
    rng = np.random.default_rng(0)
    shapes = [(3, LENGTH, h, head_dim) for h in (heads, kv_heads, kv_heads)]
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def reference_attention(q, k, v, segments, prefixes=None):
    """The definition: one softmax over every key, masked as `attention_mask` says."""
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    scores = jnp.where(attention_mask(segments, prefixes)[:, None], scores, -jnp.inf)
    probs = jnp.nan_to_num(jax.nn.softmax(scores, axis=-1))  # rows of padding see nothing
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def assert_same_as_reference(implementation, shared_prefix: bool, **shapes) -> None:
    """Outputs at non-padding tokens and gradients of a weighted sum of them match the
    reference; the outputs are finite everywhere."""
    segments, prefixes = packed_segments(shared_prefix)
    q, k, v = qkv(**shapes)
    weights = jax.random.normal(jax.random.key(1), q.shape) * (segments != 0)[..., None, None]

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, segments, prefixes).astype(jnp.float32) * weights)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want_grads = jax.grad(lambda *a: loss(reference_attention, *a), (0, 1, 2))(*f32)
    got_grads = jax.jit(jax.grad(lambda *a: loss(implementation, *a), (0, 1, 2)))(q, k, v)
    real = (segments != 0)[..., None, None]
    out = implementation(q, k, v, segments, prefixes)
    assert out.dtype == q.dtype
    assert bool(jnp.isfinite(out).all())
    tolerance = 2e-6 if q.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        jnp.where(real, out.astype(jnp.float32), 0),
        jnp.where(real, reference_attention(*f32, segments, prefixes), 0),
        atol=tolerance,
    )
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(
            g.astype(jnp.float32), w, atol=10 * tolerance * float(jnp.abs(w).max())
        )


def splash_interpret(*args):
    return splash_attention(*args, interpret=True)


def cudnn_via_xla(*args):
    return cudnn_attention(*args, implementation="xla")


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize(
    "shapes",
    [
        {},  # 4 heads in 2 groups, head_dim 16, length 200 (not a multiple of 64)
        {"heads": 3, "kv_heads": 3, "head_dim": 24},  # no grouping; head_dim padded to 32
        {"heads": 8, "kv_heads": 1, "head_dim": 64},
    ],
)
def test_cpu_flash_kernel_equals_the_reference(shared_prefix, shapes):
    assert jaxrm.model.attention.available()  # the kernel built here; xla_attention runs it on CPU
    assert_same_as_reference(xla_attention, shared_prefix, **shapes)


def test_cpu_flash_kernel_follows_the_mask_for_scattered_ids():
    """Segments that are not contiguous, negative ids, prefixes naming later segments."""
    rng = np.random.default_rng(5)
    segments = jnp.asarray(rng.integers(-2, 6, (3, LENGTH)), jnp.int32)
    prefixes = jnp.asarray(rng.integers(0, 6, (3, LENGTH)) * (rng.random((3, LENGTH)) < 0.3))
    q, k, v = qkv()
    real = (segments != 0)[..., None, None]
    want = reference_attention(q, k, v, segments, prefixes)
    got = xla_attention(q, k, v, segments, prefixes)
    np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), atol=2e-6)


def test_cpu_flash_kernel_takes_bfloat16():
    assert_same_as_reference(xla_attention, shared_prefix=True, dtype=jnp.bfloat16)


def test_cpu_flash_kernel_sees_nothing_in_a_row_of_padding():
    q, k, v = qkv()
    segments = jnp.zeros((3, LENGTH), jnp.int32).at[1, :10].set(1)
    out, grads = jax.value_and_grad(lambda q: xla_attention(q, k, v, segments).sum())(q)
    assert bool(jnp.isfinite(out)) and bool(jnp.isfinite(grads).all())
    assert not bool(grads[0].any()) and not bool(grads[2].any())  # no query of rows 0, 2 sees


@pytest.mark.parametrize("kv_axis", [0, None])
def test_cpu_flash_kernel_under_vmap_equals_the_reference_per_example(kv_axis):
    segments, prefixes = packed_segments(shared_prefix=True)
    q, k, v = qkv()
    queries = jnp.stack([q, q[::-1] * 0.5])
    keys, values = (jnp.stack([x, x[::-1]]) if kv_axis == 0 else x for x in (k, v))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, segments, prefixes) ** 2)

    def per_example(fn, q, k, v):
        mapped = jax.vmap(lambda q, k, v: loss(fn, q, k, v), in_axes=(0, kv_axis, kv_axis))
        return jnp.sum(mapped(q, k, v))

    got = jax.value_and_grad(lambda q: per_example(xla_attention, q, keys, values))(queries)
    want = jax.value_and_grad(lambda q: per_example(reference_attention, q, keys, values))(queries)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5 * float(jnp.abs(want[1]).max()))


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_xla_einsums_equal_the_reference(monkeypatch, shared_prefix):
    monkeypatch.setenv(CPU_FLASH_ENV, "0")
    assert_same_as_reference(xla_attention, shared_prefix)


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_splash_equals_the_reference(shared_prefix):
    assert_same_as_reference(splash_interpret, shared_prefix)


@pytest.mark.parametrize("kernel", ["splash", "cpu_flash"])
@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 2, 2)])
def test_kernels_run_per_shard_under_a_mesh(kernel, mesh_shape):
    # tensor=4 splits the 4 query heads but not the 2 kv heads; tensor=2 splits both.
    implementation = splash_interpret if kernel == "splash" else xla_attention
    with activation_sharding(make_mesh(*mesh_shape), DEFAULT_RULES):
        assert_same_as_reference(implementation, shared_prefix=True)


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_cudnn_call_path_equals_the_reference(shared_prefix):
    assert_same_as_reference(cudnn_via_xla, shared_prefix)


def test_cudnn_path_traces_where_cudnn_is_present():
    segments, _ = packed_segments(False)
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv())
    try:
        jax.jit(cudnn_attention).lower(q, k, v, segments)
    except RuntimeError as e:  # jax checks for cuDNN while tracing
        pytest.skip(f"jax will not trace cuDNN attention here: {e}")


@pytest.mark.parametrize(("implementation", "platform"), [("splash", "TPU"), ("cudnn", "GPU")])
def test_kernel_off_its_backend_is_a_user_error(implementation, platform):
    segments, _ = packed_segments(False)
    with pytest.raises(UserError, match=rf"model.attention: {implementation} .*{platform}.* cpu"):
        attention(*qkv(), segments, None, implementation)


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_whole_model_with_splash_gives_xla_rewards_and_gradients(monkeypatch, shared_prefix):
    monkeypatch.setenv(INTERPRET_ENV, "1")
    segments, prefixes = packed_segments(shared_prefix)
    tokens = jax.random.randint(jax.random.key(2), segments.shape, 1, 1024) * (segments != 0)
    starts = 50 * (prefixes > 0) if shared_prefix else 0  # candidates continue the 50-token prefix
    index = jnp.arange(LENGTH)
    first = jax.vmap(lambda s: jnp.argmax(s[None, :] == s[:, None], axis=-1))(segments)
    positions = (index - first + starts) * (segments != 0)

    def rewards(implementation):
        config = load_config(None, ["model.dtype=float32", f"model.attention={implementation}"])
        model = create_model(config.model, seed=0)
        graphdef, params = nnx.split(model)

        def total(params):
            model = nnx.merge(graphdef, params)
            scores = model.token_rewards(model(tokens, segments, positions, prefixes))
            found = rewards_at(scores, last_token_index(segments, num_segments=4))
            return found.sum(), found

        return jax.jit(jax.value_and_grad(total, has_aux=True))(params)

    (_, want), want_grads = rewards("xla")
    (_, got), got_grads = rewards("splash")
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, float(jnp.abs(w).max())))


def test_config_names_unknown_attention_and_cudnn_in_float32():
    with pytest.raises(UserError, match=r"model.attention.*'xla', 'splash', 'cudnn'"):
        load_config(None, ["model.attention=flash"])
    with pytest.raises(UserError, match=r"model.attention: cudnn .*model.dtype"):
        load_config(None, ["model.attention=cudnn", "model.dtype=float32"])
    assert load_config(None, ["model.attention=splash"]).model.attention == "splash"


def test_a_span_skips_only_keys_no_token_reaches(monkeypatch):
    monkeypatch.setenv(CPU_FLASH_ENV, "0")  # the kernel skips by the segment ids alone
    rng = np.random.default_rng(3)
    length, span = 600, 48
    segments = np.zeros((2, length), np.int32)
    prefixes = np.zeros((2, length), np.int32)
    start, segment = 0, 0
    while start < length - span:  # row 0: sequences of 1 to `span` tokens
        size = int(rng.integers(1, span + 1))
        segment += 1
        segments[0, start : start + size] = segment
        start += size
    # row 1: prefixes of 20 tokens, each continued by two candidates of 14 (20 + 14 <= 34)
    for i, first in enumerate(range(0, 540, 48)):
        segments[1, first : first + 20] = 3 * i + 1
        segments[1, first + 20 : first + 34] = 3 * i + 2
        segments[1, first + 34 : first + 48] = 3 * i + 3
        prefixes[1, first + 20 : first + 48] = 3 * i + 1
    q, k, v = (jnp.asarray(rng.normal(size=(2, length, h, 8)), jnp.float32) for h in (4, 2, 2))
    ids, prefix = jnp.asarray(segments), jnp.asarray(prefixes)
    real = np.asarray(segments != 0)[..., None, None]
    whole = xla_attention(q, k, v, ids, prefix)
    spanned = xla_attention(q, k, v, ids, prefix, span=2 * 34)  # two sequences' worth
    np.testing.assert_allclose(np.where(real, spanned, 0), np.where(real, whole, 0), atol=1e-6)
    one_sequence = jnp.ones((2, length), jnp.int32)  # reaches back further than any span
    too_short = xla_attention(q, k, v, one_sequence, span=10)
    assert not np.allclose(too_short, xla_attention(q, k, v, one_sequence), atol=1e-3)
