"""The reward model: one decoder for the Llama, Qwen2 and InternLM2 families, plus heads.

    model = RewardModel(config, rngs=nnx.Rngs(0))
    hidden = model(tokens, segment_ids, positions)      # [batch, length, embed], final-normed
    scores = model.token_rewards(hidden)                # [batch, length] float32
    rewards = rewards_at(scores, last_token_index(segment_ids, num_segments=3))

Rows are packed: `segment_ids` numbers the sequences of a row 1, 2, ... (0 is padding) and
`positions` restarts at 0 in each sequence. A token attends to earlier tokens of its own segment
only, so a packed row computes exactly what its sequences would compute one by one. A candidate
packed after a shared prefix also attends to the prefix segment named by its `prefix_ids`.

The math follows Hugging Face's Llama (RMSNorm in float32, "rotate half" RoPE, grouped-query
attention, SwiGLU), so weights convert without permutation. Layers are stacked on a leading
`layers` axis and run with `lax.scan`: compile time does not grow with depth.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm.config import Config, ModelConfig
from jaxrm.model.attention import attention
from jaxrm.model.matmul import dense
from jaxrm.sharding import Rules, constrain, target_platform, tree_shardings

Array = jax.Array
# One layer's attention: (q, k, v, that layer's carried item) -> (output, its new item).
Attend = Callable[[Array, Array, Array, Any], tuple[Array, Any]]

HIDDEN = ("batch", "length", "act_embed")  # the axes of a layer's input and output
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(
    rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], dtype: Any, std: float = 0.02
) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32) if std else jnp.zeros(shape)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


def _add_lora(
    module: nnx.Module, name: str, in_dims: int, config: ModelConfig, rngs: nnx.Rngs
) -> None:
    """LoRA factors for kernel `name` when targeted: A [in..., rank] random, B [rank, out...] zero,
    so training starts from the base model exactly."""
    if config.lora_rank == 0 or name not in config.lora_targets:
        return
    kernel = getattr(module, name)
    axes = kernel.get_metadata()["out_sharding"]
    shape, dtype, rank = kernel.shape, kernel.dtype, config.lora_rank
    fan_in = math.prod(shape[:in_dims])
    a = jax.random.normal(rngs.params(), (*shape[:in_dims], rank)) / math.sqrt(fan_in)
    setattr(
        module,
        f"{name}_lora_a",
        nnx.LoRAParam(a.astype(dtype), out_sharding=(*axes[:in_dims], None), eager_sharding=False),
    )
    setattr(
        module,
        f"{name}_lora_b",
        nnx.LoRAParam(
            jnp.zeros((rank, *shape[in_dims:]), dtype),
            out_sharding=(None, *axes[in_dims:]),
            eager_sharding=False,
        ),
    )


def lora_scale(config: ModelConfig) -> float:
    return config.lora_alpha / config.lora_rank if config.lora_rank else 0.0


def lora_delta(a: Array, b: Array, scale: float) -> Array:
    """The kernel update scale * A @ B, contracting the rank axis."""
    return jnp.tensordot(a, b, axes=1) * scale


def _kernel(module: nnx.Module, name: str, dtype: Any) -> Array:
    kernel = getattr(module, name)[...]
    a = getattr(module, f"{name}_lora_a", None)
    if a is not None:
        kernel = kernel + lora_delta(
            a[...], getattr(module, f"{name}_lora_b")[...], module.lora_scale
        )
    return kernel.astype(dtype)


def merge_lora(params: dict, config: ModelConfig) -> dict:
    """Pure-dict params with every adapter folded into its kernel and removed (for export)."""

    def merge(tree: dict) -> dict:
        out = {}
        for key, value in tree.items():
            if key.endswith(("_lora_a", "_lora_b")):
                continue
            if isinstance(value, dict):
                out[key] = merge(value)
            elif f"{key}_lora_a" in tree:
                a, b = tree[f"{key}_lora_a"], tree[f"{key}_lora_b"]
                delta = jax.vmap(lambda x, y: lora_delta(x, y, lora_scale(config)))(a, b)
                out[key] = (value + delta).astype(value.dtype)
            else:
                out[key] = value
        return out

    return merge(params)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair rotation speeds, with HF's linear / llama3 scaling applied.

    "dynamic" (NTK) scaling only changes anything past `max_position_embeddings`, and then by a
    per-sequence amount; within that length it equals no scaling, and the config refuses a
    `data.seq_len` beyond it.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind == "linear":
        return inv_freq / np.float32(scaling["factor"])
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


Rotation = tuple[Array, Array]  # cos and sin of each token's angles, [batch, length, 1, dim / 2]


def rope_rotation(positions: Array, inv_freq: Array, limit: int | None = None) -> Rotation:
    """The rotation every layer applies at `positions`, computed once for the whole stack.

    With `limit` (static: every position is below it, as in a packed row of `limit` tokens) the
    angles are looked up in a table of `limit` rows; a position outside it gives NaN, never a
    wrong angle. XLA:CPU would otherwise recompute cos and sin inside each layer's rotation, for
    every head and both halves: about 3% of a training step.
    """
    if limit is None:
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        cos, sin = jnp.cos(angles), jnp.sin(angles)
    else:
        table = jnp.arange(limit, dtype=jnp.float32)[:, None] * inv_freq
        cos, sin = (
            jnp.take(f(table), positions, axis=0, mode="fill", fill_value=jnp.nan)
            for f in (jnp.cos, jnp.sin)
        )
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: Array, rotation: Rotation) -> Array:
    """Rotates [batch, length, heads, head_dim] by position, HF "rotate half" layout."""
    cos, sin = (part.astype(x.dtype) for part in rotation)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype: Any):
        self.eps = eps
        self.scale = nnx.Param(
            jnp.ones((size,), param_dtype), out_sharding=("norm",), eager_sharding=False
        )

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        e, n, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.dtype = dtype
        self.wq = _param(rngs, (e, n, d), ("embed", "heads", "head_dim"), param_dtype)
        self.wk = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wv = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wo = _param(rngs, (n, d, e), ("heads", "head_dim", "embed"), param_dtype)
        self.lora_scale = lora_scale(config)
        for name in ("wq", "wk", "wv"):
            _add_lora(self, name, 1, config, rngs)
        _add_lora(self, "wo", 2, config, rngs)
        if config.qkv_bias:
            self.bq = _param(rngs, (n, d), ("heads", "head_dim"), param_dtype, std=0)
            self.bk = _param(rngs, (k, d), ("kv_heads", "head_dim"), param_dtype, std=0)
            self.bv = _param(rngs, (k, d), ("kv_heads", "head_dim"), param_dtype, std=0)
        else:
            self.bq = self.bk = self.bv = None

    def _project(self, x: Array, name: str, bias: nnx.Param | None) -> Array:
        y = dense(x, _kernel(self, name, self.dtype))
        return y if bias is None else y + bias[...].astype(self.dtype)

    def __call__(
        self, x: Array, rotation: Rotation, attend: Attend, carried: Any
    ) -> tuple[Array, Any]:
        q = apply_rope(self._project(x, "wq", self.bq), rotation)
        k = apply_rope(self._project(x, "wk", self.bk), rotation)
        v = self._project(x, "wv", self.bv)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        out, carried = attend(q, k, v, carried)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return dense(out, _kernel(self, "wo", self.dtype), contract=2), carried


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.dtype = dtype
        self.gate = _param(rngs, (e, m), ("embed", "mlp"), param_dtype)
        self.up = _param(rngs, (e, m), ("embed", "mlp"), param_dtype)
        self.down = _param(rngs, (m, e), ("mlp", "embed"), param_dtype)
        self.lora_scale = lora_scale(config)
        for name in ("gate", "up", "down"):
            _add_lora(self, name, 1, config, rngs)

    def __call__(self, x: Array) -> Array:
        gate = dense(x, _kernel(self, "gate", self.dtype))
        up = dense(x, _kernel(self, "up", self.dtype))
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return dense(hidden, _kernel(self, "down", self.dtype))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.attention_norm = RMSNorm(config.hidden_size, eps, param_dtype)
        self.attention = Attention(config, dtype, param_dtype, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, eps, param_dtype)
        self.mlp = MLP(config, dtype, param_dtype, rngs)

    def __call__(
        self, x: Array, rotation: Rotation, attend: Attend, carried: Any
    ) -> tuple[Array, Any]:
        mixed, carried = self.attention(self.attention_norm(x), rotation, attend, carried)
        x = x + mixed
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, HIDDEN), carried


class RewardModel(nnx.Module):
    """Decoder + scalar reward head (Linear(hidden, 1), no bias) + optional LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.dtype = dtype
        self.remat = config.remat
        self.attention = config.attention
        self.layer_loop = config.layer_loop
        self.inv_freq = tuple(float(f) for f in rope_inverse_frequencies(config))
        self.tie_embeddings = config.tie_embeddings
        e, v = config.hidden_size, config.vocab_size
        self.embed = _param(rngs, (v, e), ("vocab", "embed"), param_dtype)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, dtype, param_dtype, rngs)

        self.layers = stacked_layers(rngs)
        self.final_norm = RMSNorm(e, config.rms_norm_eps, param_dtype)
        head_std = 0.0 if config.reward_head_init == "zero" else 0.02
        self.score = _param(
            rngs, (e, config.num_labels), ("embed", "score"), param_dtype, std=head_std
        )
        self.reward_weights = tuple(config.reward_weights)
        untied_lm_head = config.lm_head and not config.tie_embeddings
        self.lm_head = (
            _param(rngs, (e, v), ("embed", "vocab"), param_dtype) if untied_lm_head else None
        )
        self.has_lm_head = config.lm_head

    def __call__(
        self,
        tokens: Array,
        segment_ids: Array,
        positions: Array,
        prefix_ids: Array | None = None,
        span: int | None = None,
    ) -> Array:
        """Final-normed hidden states [batch, length, embed] in the compute dtype.

        Each position is below the row length (it counts tokens of a sequence in the row); one
        that is not makes its token's output NaN.
        `prefix_ids` (optional) gives, per token, the shared-prefix segment it also attends to.
        `span` (optional, static) promises that no token attends further back than that many
        tokens, which lets attention skip the keys before (see `losses.attention_span`).
        """

        attend = self.packed_attention(segment_ids, prefix_ids, span)
        x = self.embed_tokens(tokens)
        hidden, _ = self.run_layers(x, positions, attend, position_limit=tokens.shape[1])
        return hidden

    def packed_attention(
        self, segment_ids: Array, prefix_ids: Array | None = None, span: int | None = None
    ) -> Attend:
        """Each layer's attention over packed rows (see `__call__`)."""

        def attend(q: Array, k: Array, v: Array, carried: None) -> tuple[Array, None]:
            return attention(q, k, v, segment_ids, prefix_ids, self.attention, span), None

        return attend

    def embed_tokens(self, tokens: Array) -> Array:
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        return constrain(x, HIDDEN)

    def run_layers(
        self,
        x: Array,
        positions: Array,
        attend: Attend,
        carried: Any = None,
        position_limit: int | None = None,
    ) -> tuple[Array, Any]:
        """Embedded tokens through every layer and the final norm.

        `attend(q, k, v, item)` is each layer's attention, given that layer's slice of `carried`
        (stacked on a leading layers axis; a KV cache when generating) and returning the
        attention output with the layer's new item. Returns (hidden, new carried).
        `position_limit` (static, optional) bounds `positions`; see `rope_rotation`.
        """
        stack = nnx.state(self.layers)
        x, carried = self.run_stack(stack, x, positions, attend, carried, position_limit)
        return self.final_norm(x), carried

    def run_stack(
        self,
        layer_states: Any,
        x: Array,
        positions: Array,
        attend: Attend,
        carried: Any = None,
        position_limit: int | None = None,
    ) -> tuple[Array, Any]:
        """`x` through the stacked layers `layer_states` (all of this model's, or a pipeline
        stage's block of them), without the final norm; see `run_layers`."""
        layer = self.layer_function(positions, attend, position_limit)

        def one_layer(h: Array, inputs: tuple[Any, Any]) -> tuple[Array, Any]:
            layer_state, item = inputs
            return layer(h, layer_state, item)

        if self.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[self.remat])
        return jax.lax.scan(one_layer, x, (layer_states, carried), unroll=self._unroll(carried))

    def layer_function(
        self, positions: Array, attend: Attend, position_limit: int | None = None
    ) -> Callable[[Array, Any, Any], tuple[Array, Any]]:
        """`layer(h, layer_params, item) -> (h, item)`: one decoder layer, given its parameters
        (one slice of the stacked layers, as nnx state or a pure dict) and its carried item."""
        graphdef = nnx.graphdef(self.layers)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        rotation = rope_rotation(positions, inv_freq, position_limit)

        def layer(h: Array, layer_params: Any, item: Any) -> tuple[Array, Any]:
            return nnx.merge(graphdef, layer_params)(h, rotation, attend, item)

        return layer

    def _unroll(self, carried: Any) -> bool:
        """XLA:CPU runs a scanned layer stack slower in training: the scan zero-fills and then
        writes the stacked activations the backward pass reads. A carried KV cache is updated
        in place by the scan, but copied whole by unrolled layers; elsewhere the scan keeps
        compiles short."""
        if self.layer_loop == "auto":
            return target_platform() == "cpu" and carried is None
        return self.layer_loop == "unroll"

    def token_scores(self, hidden: Array) -> Array:
        """The reward head's outputs at every position, [batch, length, num_labels], float32."""
        head = self.score[...].astype(jnp.float32)
        return jnp.einsum("bte,eo->bto", hidden.astype(jnp.float32), head)

    def token_rewards(self, hidden: Array) -> Array:
        """The reward at every position, [batch, length], float32: the head's one output, or
        its attributes' weighted sum (`model.attribute_weights`)."""
        return self.reward_of(self.token_scores(hidden))

    def reward_of(self, scores: Array) -> Array:
        """The reward from the head's outputs [..., num_labels]."""
        if scores.shape[-1] == 1:
            return scores[..., 0]
        return scores @ jnp.asarray(self.reward_weights, jnp.float32)

    def lm_logits(self, hidden: Array) -> Array:
        """Next-token logits [batch, length, vocab], float32 (needs `model.lm_head: true`)."""
        if not self.has_lm_head:
            raise ValueError("this model has no LM head (set model.lm_head: true)")
        if self.lm_head is None:
            kernel = self.embed[...].astype(self.dtype).T
        else:
            kernel = self.lm_head[...].astype(self.dtype)
        logits = jnp.einsum("bte,ev->btv", hidden, kernel, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))


def last_token_index(segment_ids: Array, num_segments: int) -> Array:
    """[batch, num_segments]: index of each segment's last token, -1 where the row has fewer."""
    ids = jnp.arange(1, num_segments + 1)[None, :, None]
    where = jnp.where(segment_ids[:, None, :] == ids, jnp.arange(segment_ids.shape[-1]), -1)
    return where.max(axis=-1)


def rewards_at(token_rewards: Array, index: Array) -> Array:
    """Gathers [batch, n] rewards at `index` (entries < 0 give 0; mask them in the loss)."""
    gathered = jnp.take_along_axis(token_rewards, jnp.maximum(index, 0), axis=-1)
    return jnp.where(index >= 0, gathered, 0.0)


def abstract_model(
    config: ModelConfig, mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None
) -> tuple[nnx.GraphDef, dict]:
    """The model's structure and its parameters as ShapeDtypeStructs (sharded when a mesh is given).

    `nnx.merge(graphdef, params)` with a matching pure dict of arrays gives the model back.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: RewardModel(config, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(state)
    if mesh is None:
        return graphdef, params
    shardings = nnx.to_pure_dict(tree_shardings(state, rules or {}, mesh))
    shaped = lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s)  # noqa: E731
    return graphdef, jax.tree.map(shaped, params, shardings)


def create_model(
    config: ModelConfig,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
) -> RewardModel:
    """A randomly initialised model, created directly in its sharding when a mesh is given."""
    if mesh is None:
        return RewardModel(config, rngs=nnx.Rngs(seed))
    graphdef, params = abstract_model(config, mesh, rules)
    shardings = jax.tree.map(lambda p: p.sharding, params)
    init = lambda: nnx.to_pure_dict(nnx.state(RewardModel(config, rngs=nnx.Rngs(seed))))  # noqa: E731
    return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())


def count_params(config: ModelConfig) -> int:
    """Number of parameters, computed from shapes alone (nothing is allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_model(config)[1]))


def segments_from_attention_mask(attention_mask: Array) -> tuple[Array, Array]:
    """(segment_ids, positions) for an ordinary left- or right-padded batch."""
    mask = attention_mask.astype(jnp.int32)
    return mask, jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


@dataclasses.dataclass
class Loaded:
    model: RewardModel
    config: Config
    tokenizer_dir: Path | None
