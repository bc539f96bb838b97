"""Model FLOPs per token and the peak they are measured against (model FLOPs utilisation).

Training FLOPs per token = 6 x (non-embedding matmul parameters) + 6 x layers x heads x head_dim
x seq_len. The first term is the forward (2 per multiply-add) and backward (4) matmuls; the
second is causal attention, whose scores and weighted sum cost 2 x 2 x heads x head_dim per
query-key pair with seq_len / 2 keys per query on average, times 3 for the backward pass. The
embedding lookup costs no FLOPs; the vocabulary projection counts only when an LM loss uses it
(CodePMP); the reward head is one dot product per token. Tokens are the non-padding tokens.
"""

import time

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


def train_flops_per_token(config: ModelConfig, seq_len: int, lm_head: bool) -> float:
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6.0 * matmul_params(config, lm_head) + attention


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
