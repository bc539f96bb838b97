"""Published model shapes, by name.

Each preset is the architecture of a public base model (from its Hugging Face config.json), plus
`published_params`: the parameter count its model card states, which the tests check our abstract
count against. A config's `model.preset` fills in these keys; any key set next to it wins.
"""

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        qkv_bias=False,
        tie_embeddings=False,
    ),
    # internlm/internlm2_5-1_8b: 1.89B. POLAR-1.8B starts here.
    "internlm2.5-1.8b": dict(
        vocab_size=92544,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=24,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1_000_000.0,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        qkv_bias=False,
        tie_embeddings=False,
        published_params=1.89e9,
    ),
    # internlm/internlm2_5-7b: 7.74B. POLAR-7B starts here.
    "internlm2.5-7b": dict(
        vocab_size=92544,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1_000_000.0,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        qkv_bias=False,
        tie_embeddings=False,
        published_params=7.74e9,
    ),
    # Qwen/Qwen2-1.5B: 1.54B, tied embeddings. CodePMP-1.5B starts here.
    "qwen2-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=131072,
        qkv_bias=True,
        tie_embeddings=True,
        published_params=1.54e9,
    ),
    # Qwen/Qwen2-7B: 7.62B. CodePMP-7B starts here.
    "qwen2-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=131072,
        qkv_bias=True,
        tie_embeddings=False,
        published_params=7.62e9,
    ),
    # meta-llama/Meta-Llama-3-8B: 8.03B.
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        qkv_bias=False,
        tie_embeddings=False,
        published_params=8.03e9,
    ),
}


def preset_shape(name: str) -> dict[str, Any]:
    """The architecture keys of preset `name` (without its published size)."""
    shape = dict(PRESETS[name])
    shape.pop("published_params", None)
    return shape
