"""Peak host memory of `jaxrm import` as a multiple of the checkpoint's size on disk.

Writes a random Llama-shaped causal LM (about 1B parameters by default, float32 safetensors in
1 GiB shards) to a temporary directory, imports it with `jaxrm import` in a child process and
reports the child's peak resident memory. Aim: at most 1.3x the size on disk.

    python benchmarks/bench_import.py [--layers 20] [--hidden 2048] [--json out.json]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxrm.hf.weight_files import ShardedWriter


def write_random_llama(
    directory: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int, kv: int
) -> int:
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    writer = ShardedWriter(directory, max_shard_bytes=2**30)

    def add(name: str, *shape: int) -> None:
        writer.add(name, rng.standard_normal(shape, np.float32) * 0.02)

    add("model.embed_tokens.weight", vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", heads * head_dim, hidden)
        add(p + "self_attn.k_proj.weight", kv * head_dim, hidden)
        add(p + "self_attn.v_proj.weight", kv * head_dim, hidden)
        add(p + "self_attn.o_proj.weight", hidden, heads * head_dim)
        add(p + "mlp.gate_proj.weight", inter, hidden)
        add(p + "mlp.up_proj.weight", inter, hidden)
        add(p + "mlp.down_proj.weight", hidden, inter)
        add(p + "input_layernorm.weight", hidden)
        add(p + "post_attention_layernorm.weight", hidden)
    add("model.norm.weight", hidden)
    add("lm_head.weight", vocab, hidden)
    writer.close()
    return writer.total_bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, out = Path(tmp) / "hf", Path(tmp) / "ckpt"
        hf_dir.mkdir()
        size = write_random_llama(
            hf_dir,
            args.layers,
            args.hidden,
            args.intermediate,
            args.vocab,
            args.heads,
            args.kv_heads,
        )
        start = time.perf_counter()
        command = [sys.executable, "-m", "jaxrm", "import", str(hf_dir), str(out), "--keep-lm-head"]
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux

    result = {
        "parameters": size // 4,
        "checkpoint_bytes": size,
        "peak_rss_bytes": peak,
        "peak_over_checkpoint": peak / size,
        "import_seconds": seconds,
    }
    print(
        f"{'checkpoint on disk':<22}{size / 2**30:8.2f} GiB  ({size // 4 / 1e9:.2f}B float32 parameters)"
    )
    print(f"{'import peak RSS':<22}{peak / 2**30:8.2f} GiB")
    print(f"{'peak / checkpoint':<22}{peak / size:8.2f} x   (aim: <= 1.3x)")
    print(f"{'import time':<22}{seconds:8.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
