"""How much of jaxrm's gradient is attention, against what attention's FLOPs alone would take.

Times the gradient of the loss on bench_train.py's batch (same model and flags) twice: as it is,
and with attention replaced by passing the queries through. The difference is attention's share;
beside it, attention's model FLOPs (jaxrm/flops.py) at the matmul peak measured in the same run.

    python benchmarks/bench_attention_share.py [--polar] [bench_train.py's model flags]
    python benchmarks/bench_attention_share.py --einsums   # CPU attention without its kernel
"""

import os
import statistics
import time
from collections.abc import Callable

os.environ["XLA_FLAGS"] = ""  # one real device, as in bench_train.py

import jax
import numpy as np
from bench_train import build_parser, make_config, make_examples, packed_batch

import jaxrm.model.attention
from jaxrm.data.packing import layout
from jaxrm.model.decoder import create_model
from jaxrm.sharding import activation_sharding, make_mesh
from jaxrm.train import losses
from jaxrm.train.flops import attention_pairs, measured_matmul_peak, train_flops
from jaxrm.train.host_memory import keep_freed_memory
from jaxrm.train.trainer import Trainer


def median_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gradient_seconds(trainer: Trainer, state: object, batch: dict) -> float:
    def loss(trainable: dict, frozen: dict) -> jax.Array:
        return trainer._loss(trainable, frozen, batch, losses.totals(batch))[0]

    with activation_sharding(trainer.mesh, trainer.rules):
        gradient = jax.jit(jax.grad(loss))
        return median_seconds(lambda: gradient(state.trainable, state.frozen))


def main() -> None:
    parser = build_parser()
    parser.add_argument(
        "--einsums", action="store_true", help="CPU attention as XLA einsums, not the C++ kernel"
    )
    args = parser.parse_args()
    keep_freed_memory()
    if args.einsums:
        os.environ[jaxrm.model.attention.CPU_FLASH_ENV] = "0"
    examples = make_examples(args, np.random.default_rng(0))
    seq_len = max(layout(e, shared_prefix=args.polar).length for e in examples)
    config = make_config(args, seq_len, max(len(s) for e in examples for s in e.sequences))
    host_batch = packed_batch(examples, config)
    mesh = make_mesh(fsdp=1)
    trainer = Trainer(config, mesh)
    state = trainer.init_state(create_model(config.model, 0, mesh, config.mesh.rules))
    batch = trainer.global_batch(host_batch)

    whole = gradient_seconds(trainer, state, batch)
    real_attention = jaxrm.model.attention.xla_attention
    jaxrm.model.attention.xla_attention = lambda q, k, v, *rest, **options: q
    try:
        without = gradient_seconds(trainer, state, batch)
    finally:
        jaxrm.model.attention.xla_attention = real_attention

    peak = measured_matmul_peak(jax.devices()[0], "float32")
    pairs = float(attention_pairs(host_batch["positions"], host_batch["segment_ids"]))
    attention_flops = train_flops(config.model, 0, pairs, lm_head=False)
    tokens = int((host_batch["segment_ids"] != 0).sum())
    rest_flops = train_flops(config.model, tokens, 0, lm_head=False)
    share = whole - without
    print(f"gradient (forward + backward), {tokens} tokens: {whole:.3f} s")
    print(f"  without attention: {without:.3f} s ({rest_flops / peak:.3f} s at the matmul peak)")
    print(
        f"  attention: {share:.3f} s ({share / whole:.0%}); its FLOPs at the matmul peak "
        f"({peak / 1e9:.0f} GFLOP/s): {attention_flops / peak:.3f} s, "
        f"{share / (attention_flops / peak):.1f}x that"
    )


if __name__ == "__main__":
    main()
