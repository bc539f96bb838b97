"""Attention behind `model.attention`: xla (any backend), splash (TPU) and cudnn (GPU).

On CPU, xla runs the C++ flash-attention kernel of `jaxrm.model.cpu_attention` as an XLA custom
call (where a C++ compiler can build it; otherwise, and with JAXRM_CPU_FLASH=0, the einsums
below).

    out = attention(q, k, v, segment_ids, prefix_ids, implementation="xla")

q is [batch, length, heads, head_dim]; k and v are [batch, length, kv_heads, head_dim] with
`heads` a multiple of `kv_heads` (grouped-query: query head h reads kv head h // (heads //
kv_heads)). All three compute what `attention_mask` allows: earlier tokens of the query's own
segment and of the shared-prefix segment it continues. Outputs at padding (segment 0) are finite
but differ between implementations; nothing reads them.
"""

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
from jax.sharding import NamedSharding

from jaxrm.errors import UserError
from jaxrm.model.cpu_attention import available, flash_attention
from jaxrm.sharding import active_mesh, logical_to_spec, target_platform

Array = jax.Array

# xla_attention's query blocks: at least this many queries each, at most this many blocks.
MIN_QUERY_BLOCK = 128
MAX_QUERY_BLOCKS = 16
# Set to 1 to run the splash kernel in Pallas interpret mode on any backend (tests; slow).
INTERPRET_ENV = "JAXRM_SPLASH_INTERPRET"
# Set to 0 to run CPU attention as the einsums instead of the C++ kernel (benchmarks, tests).
CPU_FLASH_ENV = "JAXRM_CPU_FLASH"


def attention_mask(segment_ids: Array, prefix_ids: Array | None = None) -> Array:
    """[batch, query, key]: not in the future, and in the query's own non-padding segment or in
    the shared-prefix segment the query continues (`prefix_ids`, 0 for none)."""
    index = jnp.arange(segment_ids.shape[-1])
    return visibility(segment_ids, segment_ids, prefix_ids, index, index)


def visibility(
    query_ids: Array, key_ids: Array, prefix_ids: Array | None, query_index: Array, key_index: Array
) -> Array:
    """`attention_mask` for some queries and keys of a row: their segment ids [batch, queries]
    and [batch, keys], the queries' prefix ids, and their places in the row."""
    causal = query_index[:, None] >= key_index[None, :]
    visible = query_ids[:, :, None] == key_ids[:, None, :]
    if prefix_ids is not None:
        continues = prefix_ids[:, :, None] == key_ids[:, None, :]
        visible |= continues & (prefix_ids[:, :, None] != 0)
    return visible & causal & (query_ids[:, :, None] != 0)


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
    any token attends (xla's einsums skip the keys before it). Where the active rules split the
    row's tokens (`mesh.context`), each shard attends with its own queries to the whole row's
    keys and values (`context_attention`)."""
    interpret = os.environ.get(INTERPRET_ENV) == "1"
    if implementation == "splash" and not interpret:
        _require_platform("splash", "tpu")
    if implementation in ("xla", "splash") and context_axes(q.shape):
        return context_attention(q, k, v, segment_ids, prefix_ids, implementation, span, interpret)
    if implementation == "xla":
        return xla_attention(q, k, v, segment_ids, prefix_ids, span)
    if implementation == "splash":
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
    """Plain einsums with float32 scores and a dense mask, a block of queries at a time; on
    CPU the flash kernel instead, which skips at run time the blocks no query sees.

    A block attends only to the keys up to its last query (the later ones are never visible)
    and, given `span`, from `span - 1` before its first query: in rows packed with many short
    sequences most keys of a long row are skipped, and causally nearly half of the rest.
    """
    if target_platform() == "cpu" and os.environ.get(CPU_FLASH_ENV) != "0" and available():
        return per_shard(flash_attention, q, k, v, segment_ids, prefix_ids)
    return blocked_attention(q, k, v, segment_ids, segment_ids, prefix_ids, 0, span)


def blocked_attention(
    q: Array,
    k: Array,
    v: Array,
    query_ids: Array,
    key_ids: Array,
    prefix_ids: Array | None,
    offset: int | Array,
    span: int | None,
) -> Array:
    """The einsums of `xla_attention` for queries at places `offset`, `offset + 1`, ... of a row
    whose every key and value is given (k, v [batch, keys, kv_heads, head_dim]).

    With a static `offset` a block's keys end at its last query; with a traced one (a context
    shard's place) the window has a static width: `span` back from the block's last query, or
    the whole row.
    """
    b, t, n, d = q.shape
    keys, kv = k.shape[1], k.shape[2]
    # Heads first, so both products are plain batched matmuls (no transposes in between).
    groups = (q * d**-0.5).reshape(b, t, kv, n // kv, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    blocks = min(MAX_QUERY_BLOCKS, -(-t // MIN_QUERY_BLOCK))
    size = -(-t // blocks)
    outs = []
    for start in range(0, t, size):
        end = min(start + size, t)
        first, width = _key_window(offset, start, end, keys, span)
        window = functools.partial(
            jax.lax.dynamic_slice_in_dim, start_index=first, slice_size=width
        )
        visible = visibility(
            query_ids[:, start:end],
            window(key_ids, axis=1),
            None if prefix_ids is None else prefix_ids[:, start:end],
            offset + jnp.arange(start, end),
            first + jnp.arange(width),
        )[:, None, None]
        scores = jnp.einsum(
            "bkgtd,bksd->bkgts",
            groups[:, :, :, start:end],
            window(k, axis=2),
            preferred_element_type=jnp.float32,
        )
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, window(v, axis=2)))
    return jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def _key_window(
    offset: int | Array, start: int, end: int, keys: int, span: int | None
) -> tuple[int | Array, int]:
    """(first key, static number of keys) that queries `offset + start .. offset + end` see."""
    if isinstance(offset, int):
        last = offset + end
        first = max(0, offset + start - span + 1) if span else 0
        return first, last - first
    width = min(keys, span - 1 + end - start) if span else keys
    return jnp.clip(offset + end - width, 0, keys - width), width


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
    """The Pallas splash kernel (TPU; `interpret=True` anywhere), causal with segment ids."""
    run = functools.partial(_splash_rows, interpret=interpret)
    return per_shard(run, q, k, v, segment_ids, prefix_ids)


def per_shard(
    kernel: Callable, q: Array, k: Array, v: Array, segment_ids: Array, prefix_ids: Array | None
) -> Array:
    """`kernel(q, k, v, segment_ids, prefix_ids)` on each shard's rows and heads.

    A kernel is opaque to XLA's partitioner, so under `activation_sharding` it runs through
    `shard_map`: rows split as the `batch` rule says, heads as `act_heads`, length whole. Where
    kv heads are not split like the query heads, each query head gets its own copy of its kv
    head so the shards line up.
    """
    active = active_mesh()
    if active is None or active[0].size == 1:
        return kernel(q, k, v, segment_ids, prefix_ids)
    mesh, rules = active
    q_spec = logical_to_spec(("batch", None, "act_heads", None), q.shape, rules, mesh)
    kv_spec = logical_to_spec(("batch", None, "act_kv_heads", None), k.shape, rules, mesh)
    if kv_spec[2] != q_spec[2]:
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    ids_spec = jax.P(q_spec[0], None)
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
        out_specs=q_spec,
        check_vma=False,  # kernels' outputs carry no varying-axes annotation
    )(q, k, v, segment_ids, prefix_ids)


def context_axes(q_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The mesh axes that the active rules split a row's tokens over (`length`), if any."""
    active = active_mesh()
    if active is None:
        return ()
    mesh, rules = active
    axes = logical_to_spec(("batch", "length", "act_heads", None), q_shape, rules, mesh)[1]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def context_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    prefix_ids: Array | None,
    implementation: str,
    span: int | None,
    interpret: bool = False,
) -> Array:
    """Attention over rows whose tokens are split over the `length` mesh axes (context
    parallelism, MaxText's all-gather strategy): each shard gathers the row's keys, values and
    key segment ids and attends with its own queries; the gradients of the gathered keys and
    values are reduce-scattered back. xla runs `blocked_attention` on the local queries; splash
    runs the kernel made for the whole row with its mask split into query shards, each shard
    taking its own part.
    """
    mesh, rules = active_mesh()
    q_spec = logical_to_spec(("batch", "length", "act_heads", None), q.shape, rules, mesh)
    kv_spec = logical_to_spec(("batch", "length", "act_kv_heads", None), k.shape, rules, mesh)
    if kv_spec[2] != q_spec[2]:
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    axes = context_axes(q.shape)
    ids_spec = jax.P(q_spec[0], q_spec[1])
    _, local_length, local_heads, _ = NamedSharding(mesh, q_spec).shard_shape(q.shape)
    if implementation == "splash":
        shards = q.shape[1] // local_length
        block = next(size for size in (512, 256, 128) if local_length % size == 0)
        kernels = _splash_kernels(
            local_heads, q.shape[1], block, interpret, prefix_ids is not None, shards
        )
        split = NamedSharding(mesh, jax.P(None, q_spec[1]))
        kernel_specs = tuple(kernel.manual_sharding_spec(split) for kernel in kernels)
    else:
        kernels, kernel_specs = (), ()

    def local(q: Array, k: Array, v: Array, ids: Array, prefix: Array | None, kernels) -> Array:
        gather = lambda x: jax.lax.all_gather(x, axes, axis=1, tiled=True)  # noqa: E731
        k, v, key_ids = gather(k), gather(v), gather(ids)
        if kernels:
            return _splash_local(q, k, v, ids, key_ids, prefix, kernels)
        offset = jax.lax.axis_index(axes) * q.shape[1]
        return blocked_attention(q, k, v, ids, key_ids, prefix, offset, span)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec, kernel_specs),
        out_specs=q_spec,
        check_vma=False,  # kernels' outputs carry no varying-axes annotation
    )(q, k, v, segment_ids, prefix_ids, kernels)


Kernels = tuple[splash_attention_kernel.SplashAttentionKernel, ...]


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
    t = q.shape[1]
    padded = -(-t // 128) * 128
    block = next(size for size in (512, 256, 128) if padded % size == 0)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    kernels = _splash_kernels(q.shape[2], padded, block, interpret, prefix_ids is not None)
    ids = pad(segment_ids)
    prefix = None if prefix_ids is None else pad(prefix_ids)
    return _splash_local(pad(q), pad(k), pad(v), ids, ids, prefix, kernels)[:, :t]


def _splash_kernels(
    heads: int, length: int, block: int, interpret: bool, prefixed: bool, q_shards: int = 1
) -> Kernels:
    """The kernel for causal rows of `length` tokens; with shared prefixes, also its twin that
    returns log-sum-exps (`_with_prefix`). `q_shards` splits the kernel's mask by queries."""
    return tuple(
        _kernel(heads, length, block, interpret, residuals, q_shards)
        for residuals in ((False, True) if prefixed else (False,))
    )


def _splash_local(
    q: Array,
    k: Array,
    v: Array,
    query_ids: Array,
    key_ids: Array,
    prefix_ids: Array | None,
    kernels: Kernels,
) -> Array:
    """The kernel over rows of queries [rows, queries, heads, head_dim] and the whole rows' keys
    and values, unscaled as the kernel takes them."""
    scale = q.shape[-1] ** -0.5
    heads_first = lambda x: x.swapaxes(1, 2)  # noqa: E731  [rows, heads, length, head_dim]
    q, k, v = heads_first(q * scale), heads_first(k), heads_first(v)
    if prefix_ids is None:
        one_row = lambda q, k, v, q_ids, k_ids: kernels[0](  # noqa: E731
            q, k, v, splash.SegmentIds(q_ids, k_ids)
        )
        out = jax.vmap(one_row)(q, k, v, query_ids, key_ids)
    else:
        one_row = lambda q, k, v, q_ids, k_ids, p_ids: _with_prefix(  # noqa: E731
            kernels, q, k, v, *_prefix_ids(q_ids, k_ids, p_ids)
        )
        out = jax.vmap(one_row)(q, k, v, query_ids, key_ids, prefix_ids)
    return out.swapaxes(1, 2)


def _kernel(
    heads: int, length: int, block: int, interpret: bool, residuals: bool, q_shards: int = 1
) -> splash_attention_kernel.SplashAttentionKernel:
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(
        mask,
        block_sizes=splash.BlockSizes(*[block] * 8),  # forward, dkv and dq blocks alike
        head_shards=1,  # shard_map hands the kernel its shard's heads and rows only
        q_seq_shards=q_shards,
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


def _prefix_ids(
    query_ids: Array, key_ids: Array, prefix_ids: Array
) -> tuple[splash.SegmentIds, splash.SegmentIds]:
    # Prefix id 0 (none) must match nothing, not the padding segment 0.
    no_prefix = jnp.where(prefix_ids > 0, prefix_ids, -1)
    return splash.SegmentIds(query_ids, key_ids), splash.SegmentIds(no_prefix, key_ids)


@jax.custom_vjp
def _with_prefix(
    kernels: Kernels,
    q: Array,
    k: Array,
    v: Array,
    own_ids: splash.SegmentIds,
    continue_ids: splash.SegmentIds,
) -> Array:
    return _with_prefix_fwd(kernels, q, k, v, own_ids, continue_ids)[0]


def _with_prefix_fwd(
    kernels: Kernels,
    q: Array,
    k: Array,
    v: Array,
    own_ids: splash.SegmentIds,
    continue_ids: splash.SegmentIds,
) -> tuple[Array, tuple]:
    with_lse = kernels[1]
    own, (own_lse,) = with_lse(q, k, v, own_ids)
    pre, (pre_lse,) = with_lse(q, k, v, continue_ids)
    # Rows without a prefix get pre_lse near the kernel's mask value (-0.7 x float32 max) and so
    # weight 0, not NaN.
    lse = jnp.logaddexp(own_lse, pre_lse)
    weight = lambda part_lse: jnp.exp(part_lse - lse)[..., None]  # noqa: E731
    out = (own * weight(own_lse) + pre * weight(pre_lse)).astype(q.dtype)
    return out, (kernels, q, k, v, own_ids, continue_ids, out, lse)


def _with_prefix_bwd(residuals: tuple, grad: Array) -> tuple:
    kernels, q, k, v, own_ids, continue_ids, out, lse = residuals
    kernel = kernels[0]
    shares = []
    for ids in (own_ids, continue_ids):
        kernel_residuals = (q, k, v, ids, None, out, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
        _, _, _, dq, dk, dv, _, _ = splash_attention_kernel._splash_attention_bwd(
            **kernel.kwargs, res=kernel_residuals, do=grad
        )
        shares.append((dq, dk, dv))
    dq, dk, dv = (a + b for a, b in zip(*shares, strict=True))
    return None, dq, dk, dv, None, None


_with_prefix.defvjp(_with_prefix_fwd, _with_prefix_bwd)
