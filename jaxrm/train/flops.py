"""Model FLOPs of training, and the peak they are measured against (model FLOPs utilisation).

Training FLOPs = 6 x (non-embedding matmul parameters) x tokens
               + 12 x layers x heads x head_dim x (query-key pairs attended).

The first term is the forward (2 per multiply-add) and backward (4) matmuls. The second is
attention: per query-key pair and head, the score and the weighted sum cost 2 x head_dim each
forward, times 3 with the backward pass. A token attends to every earlier token of its sequence
(in a packed row: of its segment, plus the shared prefix it continues), so it contributes
`position + 1` pairs; a full causal sequence of n tokens has n(n+1)/2. Only the pairs the model
needs are counted, not those a masked dense kernel computes and throws away. The embedding
lookup costs no FLOPs; the vocabulary projection counts only when an LM loss uses it (CodePMP);
the reward head is one dot product per token. Tokens are the non-padding tokens.
"""

import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxrm.config import ModelConfig

# Dense bf16 matmul peak per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_params(config: ModelConfig, lm_head: bool) -> int:
    e, n, k, d, m = (
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
    )
    per_layer = e * n * d * 2 + e * k * d * 2 + e * m * 3
    return config.num_layers * per_layer + e + (e * config.vocab_size if lm_head else 0)


def train_flops(config: ModelConfig, tokens: float, attention_pairs: float, lm_head: bool) -> float:
    attention = 12.0 * config.num_layers * config.num_heads * config.head_dim * attention_pairs
    return 6.0 * matmul_params(config, lm_head) * tokens + attention


def attention_pairs(positions: Any, segment_ids: Any) -> Any:
    """Query-key pairs attended in packed rows (numpy or jax arrays): position + 1 per token."""
    return ((positions + 1) * (segment_ids != 0)).sum()


def train_flops_per_token(config: ModelConfig, seq_len: int, lm_head: bool) -> float:
    """Per token of full causal sequences of `seq_len` tokens (about seq_len / 2 pairs each)."""
    return train_flops(config, 1, (seq_len + 1) / 2, lm_head)


def peak_flops(device: jax.Device, dtype: str) -> float:
    """The chip's published matmul peak, or, for CPUs and unknown chips, one measured here."""
    for kind, peak in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind):
            return peak
    return measured_matmul_peak(device, dtype)


def measured_matmul_peak(device: jax.Device, dtype: str, size: int = 1024) -> float:
    """FLOP/s of the fastest of a few square matmuls in `dtype` on `device`."""
    x = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
