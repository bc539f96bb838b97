"""Attention behind `model.attention`: xla (any backend), splash (TPU) and cudnn (GPU).

    out = attention(q, k, v, segment_ids, prefix_ids, implementation="xla")

q is [batch, length, heads, head_dim]; k and v are [batch, length, kv_heads, head_dim] with
`heads` a multiple of `kv_heads` (grouped-query: query head h reads kv head h // (heads //
kv_heads)). All three compute what `attention_mask` allows: earlier tokens of the query's own
segment and of the shared-prefix segment it continues. Outputs at padding (segment 0) are finite
but differ between implementations; nothing reads them.
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

from jaxrm.errors import UserError
from jaxrm.sharding import active_mesh, logical_to_spec, target_platform

Array = jax.Array

# xla_attention's query blocks: at least this many queries each, at most this many blocks.
MIN_QUERY_BLOCK = 128
MAX_QUERY_BLOCKS = 16
# Set to 1 to run the splash kernel in Pallas interpret mode on any backend (tests; slow).
INTERPRET_ENV = "JAXRM_SPLASH_INTERPRET"


def attention_mask(segment_ids: Array, prefix_ids: Array | None = None) -> Array:
    """[batch, query, key]: not in the future, and in the query's own non-padding segment or in
    the shared-prefix segment the query continues (`prefix_ids`, 0 for none)."""
    length = segment_ids.shape[-1]
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    visible = segment_ids[:, :, None] == segment_ids[:, None, :]
    if prefix_ids is not None:
        continues = prefix_ids[:, :, None] == segment_ids[:, None, :]
        visible |= continues & (prefix_ids[:, :, None] != 0)
    return visible & causal & (segment_ids[:, :, None] != 0)


def attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    prefix_ids: Array | None,
    implementation: str,
    span: int | None = None,
) -> Array:
    """Dispatches to the implementation named by `model.attention`; `span` bounds how far back
    any token attends (xla skips the keys before it)."""
    if implementation == "xla":
        return xla_attention(q, k, v, segment_ids, prefix_ids, span)
    if implementation == "splash":
        interpret = os.environ.get(INTERPRET_ENV) == "1"
        if not interpret:
            _require_platform("splash", "tpu")
        return splash_attention(q, k, v, segment_ids, prefix_ids, interpret=interpret)
    if implementation == "cudnn":
        _require_platform("cudnn", "gpu")
        return cudnn_attention(q, k, v, segment_ids, prefix_ids)
    raise ValueError(f"unknown attention implementation {implementation!r}")


def _require_platform(implementation: str, platform: str) -> None:
    found = target_platform()
    if found != platform:
        raise UserError(
            f"model.attention: {implementation} runs only on {platform.upper()}, but the backend "
            f"is {found}; use model.attention: xla"
        )


def xla_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    prefix_ids: Array | None = None,
    span: int | None = None,
) -> Array:
    """Plain einsums with float32 scores and a dense mask, a block of queries at a time.

    A block attends only to the keys up to its last query (the later ones are never visible)
    and, given `span`, from `span - 1` before its first query: in rows packed with many short
    sequences most keys of a long row are skipped, and causally nearly half of the rest. On CPU,
    `skipping_attention` also skips, at run time, the key blocks of other sequences.
    """
    b, t, n, d = q.shape
    kv = k.shape[2]
    # Heads first, so both products are plain batched matmuls (no transposes in between).
    groups = (q * d**-0.5).reshape(b, t, kv, n // kv, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if target_platform() == "cpu":
        visible = attention_mask(segment_ids, prefix_ids)
        out = skipping_attention(groups, k, v, visible, span)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)
    mask = attention_mask(segment_ids, prefix_ids)[:, None, None]
    blocks = min(MAX_QUERY_BLOCKS, -(-t // MIN_QUERY_BLOCK))
    size = -(-t // blocks)
    outs = []
    for start in range(0, t, size):
        end = min(start + size, t)
        first = max(0, start - span + 1) if span else 0
        scores = jnp.einsum(
            "bkgtd,bksd->bkgts",
            groups[:, :, :, start:end],
            k[:, :, first:end],
            preferred_element_type=jnp.float32,
        )
        visible = mask[..., start:end, first:end]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, v[:, :, first:end]))
    return jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


# skipping_attention's square blocks of queries and keys.
SKIP_BLOCK = 128
_HIDDEN = jnp.finfo(jnp.float32).min / 2  # a score no visible key has; exp(_HIDDEN - real) = 0


def skipping_attention(
    groups: Array, k: Array, v: Array, visible: Array, span: int | None = None
) -> Array:
    """Attention in blocks of SKIP_BLOCK queries x SKIP_BLOCK keys with an online softmax (flash
    attention), computing only the blocks where some query of the batch sees some key.

    groups: [b, kv, g, t, d] scaled queries; k, v: [b, kv, t, d]; visible: [b, t, t]. Which blocks
    are needed is data (segment ids), so each block is a runtime `lax.cond`; with sequences that
    start on block boundaries, the blocks of other sequences and padding cost nothing. Returns
    [b, kv, g, t, d] in v's dtype.
    """
    t = groups.shape[3]
    padded = -(-t // SKIP_BLOCK) * SKIP_BLOCK
    if padded != t:
        extra = padded - t
        groups = jnp.pad(groups, ((0, 0),) * 3 + ((0, extra), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) for x in (k, v))
        visible = jnp.pad(visible, ((0, 0), (0, extra), (0, extra)))
    out = _skipping(groups, k, v, visible, span)
    return out[:, :, :, :t]


def _key_blocks(query_block: int, span: int | None) -> range:
    """The key blocks a causal attention within `span` may need for this query block."""
    first = max(0, query_block * SKIP_BLOCK - span + 1) // SKIP_BLOCK if span else 0
    return range(first, query_block + 1)


def _blocks_needed(visible: Array) -> Array:
    b, t, _ = visible.shape
    n = t // SKIP_BLOCK
    return visible.reshape(b, n, SKIP_BLOCK, n, SKIP_BLOCK).any(axis=(0, 2, 4))


def _slice(x: Array, block: int, axis: int) -> Array:
    return jax.lax.slice_in_dim(x, block * SKIP_BLOCK, (block + 1) * SKIP_BLOCK, axis=axis)


def _scores(q: Array, k: Array, visible: Array) -> Array:
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(visible[:, None, None], scores, _HIDDEN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _skipping(groups: Array, k: Array, v: Array, visible: Array, span: int | None) -> Array:
    return _skipping_fwd(groups, k, v, visible, span)[0]


def _skipping_fwd(
    groups: Array, k: Array, v: Array, visible: Array, span: int | None
) -> tuple[Array, tuple]:
    b, kv, g, t, d = groups.shape
    needed = _blocks_needed(visible)
    outs, logsumexps = [], []
    for i in range(t // SKIP_BLOCK):
        q = _slice(groups, i, 3)
        carry = (
            jnp.full((b, kv, g, SKIP_BLOCK), _HIDDEN, jnp.float32),
            jnp.zeros((b, kv, g, SKIP_BLOCK), jnp.float32),
            jnp.zeros((b, kv, g, SKIP_BLOCK, d), jnp.float32),
        )
        for j in _key_blocks(i, span):

            def update(carry: tuple, q: Array = q, j: int = j, i: int = i) -> tuple:
                top, total, acc = carry
                scores = _scores(q, _slice(k, j, 2), _slice(_slice(visible, i, 1), j, 2))
                new_top = jnp.maximum(top, scores.max(-1))
                rescale = jnp.exp(top - new_top)
                probs = jnp.exp(scores - new_top[..., None])
                acc = acc * rescale[..., None] + jnp.einsum(
                    "bkgts,bksd->bkgtd", probs, _slice(v, j, 2).astype(jnp.float32)
                )
                return new_top, total * rescale + probs.sum(-1), acc

            carry = jax.lax.cond(needed[i, j], update, lambda c: c, carry)
        top, total, acc = carry
        total = jnp.where(total > 0, total, 1.0)  # a block of padding queries saw nothing
        outs.append(acc / total[..., None])
        logsumexps.append(top + jnp.log(total))
    out = jnp.concatenate(outs, axis=3)
    residuals = (groups, k, v, visible, needed, out, jnp.concatenate(logsumexps, axis=3))
    return out.astype(v.dtype), residuals


def _skipping_bwd(span: int | None, residuals: tuple, grad: Array) -> tuple:
    groups, k, v, visible, needed, out, logsumexp = residuals
    t = groups.shape[3]
    grad = grad.astype(jnp.float32)
    delta = (grad * out).sum(-1)  # rowsum(dO * O): the softmax gradient's subtrahend
    blocks = t // SKIP_BLOCK
    dq = [jnp.zeros(_slice(groups, 0, 3).shape, jnp.float32) for _ in range(blocks)]
    dk = [jnp.zeros(_slice(k, 0, 2).shape, jnp.float32) for _ in range(blocks)]
    dv = [jnp.zeros(_slice(v, 0, 2).shape, jnp.float32) for _ in range(blocks)]
    for i in range(blocks):
        for j in _key_blocks(i, span):

            def update(carry: tuple, i: int = i, j: int = j) -> tuple:
                dq_i, dk_j, dv_j = carry
                q, key, value = _slice(groups, i, 3), _slice(k, j, 2), _slice(v, j, 2)
                g_i = _slice(grad, i, 3)
                scores = _scores(q, key, _slice(_slice(visible, i, 1), j, 2))
                probs = jnp.exp(scores - _slice(logsumexp, i, 3)[..., None])
                dv_j = dv_j + jnp.einsum("bkgts,bkgtd->bksd", probs, g_i)
                dprobs = jnp.einsum("bkgtd,bksd->bkgts", g_i, value.astype(jnp.float32))
                dscores = probs * (dprobs - _slice(delta, i, 3)[..., None])
                dq_i = dq_i + jnp.einsum("bkgts,bksd->bkgtd", dscores, key.astype(jnp.float32))
                dk_j = dk_j + jnp.einsum("bkgts,bkgtd->bksd", dscores, q.astype(jnp.float32))
                return dq_i, dk_j, dv_j

            dq[i], dk[j], dv[j] = jax.lax.cond(
                needed[i, j], update, lambda c: c, (dq[i], dk[j], dv[j])
            )
    return (
        jnp.concatenate(dq, axis=3).astype(groups.dtype),
        jnp.concatenate(dk, axis=2).astype(k.dtype),
        jnp.concatenate(dv, axis=2).astype(v.dtype),
        None,
    )


_skipping.defvjp(_skipping_fwd, _skipping_bwd)


def cudnn_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    prefix_ids: Array | None = None,
    implementation: str = "cudnn",
) -> Array:
    """`jax.nn.dot_product_attention`, cuDNN flash attention by default (bf16 / fp16 only).

    Its public entry point takes packed segments only as a dense boolean mask, which jax turns
    into an additive [batch, 1, length, length] bias (cuDNN also returns that bias's gradient);
    `is_causal` still lets cuDNN skip the blocks above the diagonal. `implementation="xla"` runs
    the same call without cuDNN.
    """
    mask = attention_mask(segment_ids, prefix_ids)[:, None]
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=q.shape[-1] ** -0.5,
        is_causal=True,
        implementation=implementation,
    )


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    prefix_ids: Array | None = None,
    *,
    interpret: bool = False,
) -> Array:
    """The Pallas splash kernel (TPU; `interpret=True` anywhere), causal with segment ids.

    Under `activation_sharding` the kernel runs per shard through `shard_map`: rows split as the
    `batch` rule says, heads as `act_heads`, length whole. Where kv heads are not split like the
    query heads, each query head gets its own copy of its kv head so the shards line up.
    """
    active = active_mesh()
    run = functools.partial(_splash_rows, interpret=interpret)
    if active is None:
        return run(q, k, v, segment_ids, prefix_ids)
    mesh, rules = active
    q_spec = logical_to_spec(("batch", None, "act_heads", None), q.shape, rules, mesh)
    kv_spec = logical_to_spec(("batch", None, "act_kv_heads", None), k.shape, rules, mesh)
    if kv_spec[2] != q_spec[2]:
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    ids_spec = jax.P(q_spec[0], None)
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
        out_specs=q_spec,
        check_vma=False,  # the splash kernel's outputs carry no varying-axes annotation
    )(q, k, v, segment_ids, prefix_ids)


def _splash_rows(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    prefix_ids: Array | None,
    interpret: bool,
) -> Array:
    """The kernel over local rows, the length padded to a multiple of 128 (padding segment 0).

    Segment ids make the kernel need kv blocks of a multiple of 128 tokens; the block is the
    largest of 512, 256, 128 that divides the padded length. The padded tokens are segment 0:
    they see only each other and are sliced off.
    """
    t, d = q.shape[1], q.shape[-1]
    padded = -(-t // 128) * 128
    block = next(size for size in (512, 256, 128) if padded % size == 0)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    heads_first = lambda x: pad(x).swapaxes(1, 2)  # noqa: E731  [rows, heads, length, head_dim]
    # The kernel does not scale the scores.
    q, k, v = heads_first(q * d**-0.5), heads_first(k), heads_first(v)
    segment_ids = pad(segment_ids)
    if prefix_ids is None:
        kernel = _kernel(q.shape[1], padded, block, interpret, residuals=False)
        one_row = lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(ids, ids))  # noqa: E731
        out = jax.vmap(one_row)(q, k, v, segment_ids)
    else:
        prefix = functools.partial(_with_prefix, block=block, interpret=interpret)
        out = jax.vmap(prefix)(q, k, v, segment_ids, pad(prefix_ids))
    return out.swapaxes(1, 2)[:, :t]


def _kernel(
    heads: int, length: int, block: int, interpret: bool, residuals: bool
) -> splash_attention_kernel.SplashAttentionKernel:
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(
        mask,
        block_sizes=splash.BlockSizes(*[block] * 8),  # forward, dkv and dq blocks alike
        head_shards=1,  # shard_map hands the kernel its shard's heads and rows only
        q_seq_shards=1,
        save_residuals=residuals,
        interpret=interpret,
    )


# Shared prefixes: a candidate token attends to its own segment and to the prefix segment it
# continues, which segment ids (equality) cannot say in one call. Two calls, one with the query's
# own segment ids and one with its prefix ids as query ids, are merged by their log-sum-exps. The
# kernel's public VJP refuses `save_residuals` (which returns the log-sum-exp), so the backward
# pass is written here: the flash backward of each call, given the merged output and log-sum-exp,
# is exactly that call's share of the gradient of the merged softmax, so the shares add up. It
# uses `_splash_attention_bwd`, private to jax's splash module (jax is pinned to 0.10.2).


def _prefix_ids(segment_ids: Array, prefix_ids: Array) -> tuple[splash.SegmentIds, ...]:
    # Prefix id 0 (none) must match nothing, not the padding segment 0.
    no_prefix = jnp.where(prefix_ids > 0, prefix_ids, -1)
    return splash.SegmentIds(segment_ids, segment_ids), splash.SegmentIds(no_prefix, segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _with_prefix(
    q: Array, k: Array, v: Array, segment_ids: Array, prefix_ids: Array, block: int, interpret: bool
) -> Array:
    return _with_prefix_fwd(q, k, v, segment_ids, prefix_ids, block, interpret)[0]


def _with_prefix_fwd(
    q: Array, k: Array, v: Array, segment_ids: Array, prefix_ids: Array, block: int, interpret: bool
) -> tuple[Array, tuple]:
    kernel = _kernel(q.shape[0], q.shape[1], block, interpret, residuals=True)
    own_ids, continue_ids = _prefix_ids(segment_ids, prefix_ids)
    own, (own_lse,) = kernel(q, k, v, own_ids)
    pre, (pre_lse,) = kernel(q, k, v, continue_ids)
    # Rows without a prefix get pre_lse near the kernel's mask value (-0.7 x float32 max) and so
    # weight 0, not NaN.
    lse = jnp.logaddexp(own_lse, pre_lse)
    weight = lambda part_lse: jnp.exp(part_lse - lse)[..., None]  # noqa: E731
    out = (own * weight(own_lse) + pre * weight(pre_lse)).astype(q.dtype)
    return out, (q, k, v, segment_ids, prefix_ids, out, lse)


def _with_prefix_bwd(block: int, interpret: bool, residuals: tuple, grad: Array) -> tuple:
    q, k, v, segment_ids, prefix_ids, out, lse = residuals
    kernel = _kernel(q.shape[0], q.shape[1], block, interpret, residuals=False)
    shares = []
    for ids in _prefix_ids(segment_ids, prefix_ids):
        kernel_residuals = (q, k, v, ids, None, out, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
        _, _, _, dq, dk, dv, _, _ = splash_attention_kernel._splash_attention_bwd(
            **kernel.kwargs, res=kernel_residuals, do=grad
        )
        shares.append((dq, dk, dv))
    dq, dk, dv = (a + b for a, b in zip(*shares, strict=True))
    return dq, dk, dv, None, None


_with_prefix.defvjp(_with_prefix_fwd, _with_prefix_bwd)
