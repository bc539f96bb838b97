"""Which HF tensors make which jaxrm parameters, for Llama, Qwen2 and InternLM2.

One table of links says which HF tensors make which jaxrm parameters and how (transpose, split
heads, the fused InternLM2 `wqkv`), and what shape the config gives each HF tensor (import checks
the file headers against it before reading); import and export both walk it, so the two
directions cannot drift apart. Flax kernels are [in, out] and torch Linear weights [out, in]; both sides use the
"rotate half" RoPE layout, so no permutation of q/k rows is needed.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import numpy as np

from jaxrm.config import ModelConfig

Arch = Literal["llama", "qwen2", "internlm2"]


ARCHS: tuple[Arch, ...] = ("llama", "qwen2", "internlm2")


@dataclasses.dataclass(frozen=True)
class Link:
    """HF tensors `hf` (names, `{i}` = layer) <-> jaxrm parameters `params` (pure-dict paths)."""

    hf: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # of the `hf` tensors, as config.json implies them
    params: tuple[tuple[str, ...], ...]
    to_jax: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]


def _one(
    hf: str, shape: tuple[int, ...], param: tuple[str, ...], to_jax: Callable, to_hf: Callable
) -> Link:
    return Link((hf,), (shape,), (param,), lambda t: [to_jax(t[0])], lambda p: [to_hf(p[0])])


def _same(hf: str, param: tuple[str, ...], *shape: int) -> Link:
    return _one(hf, shape, param, lambda w: w, lambda w: w)


def _linear(hf: str, param: tuple[str, ...], in_size: int, *out_shape: int) -> Link:
    """torch [out, in] <-> flax [in, *out_shape]."""
    return _one(
        hf,
        (math.prod(out_shape), in_size),
        param,
        lambda w: w.T.reshape(in_size, *out_shape),
        lambda k: k.reshape(k.shape[0], -1).T,
    )


def _heads_out(hf: str, param: tuple[str, ...], heads: int, head_dim: int, embed: int) -> Link:
    """torch o_proj [embed, heads*head_dim] <-> flax [heads, head_dim, embed]."""
    return _one(
        hf,
        (embed, heads * head_dim),
        param,
        lambda w: w.T.reshape(heads, head_dim, embed),
        lambda k: k.reshape(heads * head_dim, -1).T,
    )


def _bias(hf: str, param: tuple[str, ...], heads: int, head_dim: int) -> Link:
    return _one(
        hf,
        (heads * head_dim,),
        param,
        lambda b: b.reshape(heads, head_dim),
        lambda b: b.reshape(-1),
    )


def _fused_wqkv(hf: str, config: ModelConfig) -> Link:
    """InternLM2's wqkv: rows grouped per KV head as [q heads of the group..., k, v]."""
    n, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    groups = n // k

    def to_jax(tensors: list[np.ndarray]) -> list[np.ndarray]:
        w = tensors[0].reshape(k, groups + 2, d, -1)
        q = w[:, :groups].reshape(n, d, -1)
        return [
            q.transpose(2, 0, 1),
            w[:, groups].transpose(2, 0, 1),
            w[:, groups + 1].transpose(2, 0, 1),
        ]

    def to_hf(params: list[np.ndarray]) -> list[np.ndarray]:
        q, kk, v = (p.transpose(1, 2, 0) for p in params)  # [heads, head_dim, embed]
        q = q.reshape(k, groups, d, -1)
        fused = np.concatenate([q, kk[:, None], v[:, None]], axis=1)
        return [fused.reshape((n + 2 * k) * d, -1)]

    attention = ("layers", "attention")
    return Link(
        (hf,),
        (((n + 2 * k) * d, config.hidden_size),),
        ((*attention, "wq"), (*attention, "wk"), (*attention, "wv")),
        to_jax,
        to_hf,
    )


def links(config: ModelConfig, arch: Arch, score: bool, lm_head: bool) -> list[Link]:
    """The weight table for `arch`; `score` / `lm_head`: include those heads."""
    n, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    embed, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    attn, mlp = ("layers", "attention"), ("layers", "mlp")
    layer = "model.layers.{i}."
    if arch == "internlm2":
        table = [
            _same("model.tok_embeddings.weight", ("embed",), vocab, embed),
            _fused_wqkv(layer + "attention.wqkv.weight", config),
            _heads_out(layer + "attention.wo.weight", (*attn, "wo"), n, d, embed),
            _linear(layer + "feed_forward.w1.weight", (*mlp, "gate"), embed, inner),
            _linear(layer + "feed_forward.w3.weight", (*mlp, "up"), embed, inner),
            _linear(layer + "feed_forward.w2.weight", (*mlp, "down"), inner, embed),
            _same(layer + "attention_norm.weight", ("layers", "attention_norm", "scale"), embed),
            _same(layer + "ffn_norm.weight", ("layers", "mlp_norm", "scale"), embed),
            _same("model.norm.weight", ("final_norm", "scale"), embed),
        ]
        score_name, lm_name = "v_head.weight", "output.weight"
    else:
        table = [
            _same("model.embed_tokens.weight", ("embed",), vocab, embed),
            _linear(layer + "self_attn.q_proj.weight", (*attn, "wq"), embed, n, d),
            _linear(layer + "self_attn.k_proj.weight", (*attn, "wk"), embed, k, d),
            _linear(layer + "self_attn.v_proj.weight", (*attn, "wv"), embed, k, d),
            _heads_out(layer + "self_attn.o_proj.weight", (*attn, "wo"), n, d, embed),
            _linear(layer + "mlp.gate_proj.weight", (*mlp, "gate"), embed, inner),
            _linear(layer + "mlp.up_proj.weight", (*mlp, "up"), embed, inner),
            _linear(layer + "mlp.down_proj.weight", (*mlp, "down"), inner, embed),
            _same(layer + "input_layernorm.weight", ("layers", "attention_norm", "scale"), embed),
            _same(
                layer + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), embed
            ),
            _same("model.norm.weight", ("final_norm", "scale"), embed),
        ]
        if config.qkv_bias:
            table += [
                _bias(layer + "self_attn.q_proj.bias", (*attn, "bq"), n, d),
                _bias(layer + "self_attn.k_proj.bias", (*attn, "bk"), k, d),
                _bias(layer + "self_attn.v_proj.bias", (*attn, "bv"), k, d),
            ]
        score_name, lm_name = "score.weight", "lm_head.weight"
    if score:
        table.append(_linear(score_name, ("score",), embed, config.num_labels))
    if lm_head and not config.tie_embeddings:
        table.append(_linear(lm_name, ("lm_head",), embed, vocab))
    return table


def head_names(arch: Arch) -> tuple[str, str]:
    """(reward head, LM head) tensor names of `arch`."""
    return (
        ("v_head.weight", "output.weight")
        if arch == "internlm2"
        else ("score.weight", "lm_head.weight")
    )
