"""`jaxrm compile-check`: does a config's train step fit a TPU slice, and how fast could it run?

    jaxrm compile-check configs/polar_pretrain_1_8b.yaml --topology v5p-64 [key=value ...] [--json]

With `libtpu` installed, no TPU is needed: libtpu describes the slice (`v5p-64`: 32 chips in a
2x4x4 torus) as compile-only devices, the config's mesh is laid over them, and the real train step
of `jaxrm/train.py` (the abstract TrainState with its shardings, a global batch of
`train.batch_size` rows shaped like `pipeline.padding_row` and sharded like
`Trainer.global_batch`) is compiled ahead of time for that TPU. No data or tokenizer is read.

Memory is XLA's `memory_analysis()` of the compiled step, per chip: arguments, outputs,
temporaries and generated code; the donated TrainState is reused for the new one, so the bytes
XLA reports as aliased are counted once. The total is checked against the chip's HBM; a step
that needs more than the TPU compiler may use is refused by it, and its figures are reported.

The step time is an estimate from an explicit roofline, not a measurement (XLA's
`cost_analysis()` counts a scanned loop's body once):
- compute: model FLOPs of one step (`jaxrm/flops.py`), plus the forward that `model.remat`
  recomputes, at every chip's bf16 matmul peak. Every row is assumed full: batch_size x seq_len
  real tokens, each attending min(position + 1, span) keys (span as in `losses.attention_span`).
- collectives: bytes each chip receives, over half its bidirectional ICI bandwidth (all links
  receiving at once). FSDP gathers each parameter shard forward and backward and reduce-scatters
  its gradient, once per micro-batch; gradients of parameters replicated over `data` are
  all-reduced; tensor parallelism all-reduces a layer's activations twice forward, twice
  backward and twice more when `model.remat: full` recomputes the forward.
- not counted: HBM-bound work (norms, softmax, the optimizer update), overlap of collectives with
  compute, kernel efficiency. The implied MFU is therefore an upper bound.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies

from jaxrm.config import FUSED_OPTIMIZERS, Config, load_config
from jaxrm.data.pipeline import padding_row
from jaxrm.errors import UserError
from jaxrm.sharding import batch_sharding, describe
from jaxrm.train.flops import PEAK_FLOPS, train_flops
from jaxrm.train.losses import attention_span
from jaxrm.train.trainer import Trainer

GIB = 1024**3
LIBTPU_PIN = "libtpu==0.0.51"  # the version pyproject.toml's test extra pins for jax 0.10.2


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation as Cloud TPU sells it."""

    name: str
    device_kind: str  # what libtpu calls its chips (the key of flops.PEAK_FLOPS)
    hbm_gib: float
    ici_bytes_per_s: float  # bidirectional, per chip, all links
    cores_per_name: int  # TensorCores per chip that the accelerator-type name counts
    grid_dims: int  # 2-D or 3-D torus
    max_chips: int  # largest single slice


# HBM, ICI and slice sizes from the Cloud TPU system-architecture pages (cloud.google.com/tpu/
# docs/v4, /v5e, /v5p, /v6e); v4's ICI, which its page omits, is 6 links x 90 GB/s both ways
# ("How to Scale Your Model", jax-ml.github.io/scaling-book/tpus). The TPU compiler may use a
# little less HBM (libtpu 0.0.51: v4 30.75, v5e 15.75, v5p 95.73, v6e 31.24 GiB) and refuses
# a step that needs more.
GENERATIONS = {
    "v4": Generation("v4", "TPU v4", 32, 540e9, 2, 3, 4096),
    "v5p": Generation("v5p", "TPU v5", 95, 1200e9, 2, 3, 6144),
    "v5e": Generation("v5e", "TPU v5 lite", 16, 400e9, 1, 2, 256),
    "v6e": Generation("v6e", "TPU v6 lite", 32, 800e9, 1, 2, 256),
}
ALIASES = {"v5litepod": "v5e"}
# Cloud TPU's small 3-D slices; from 64 chips on, a 3-D slice is made of 4x4x4 cubes.
SMALL_3D_GRIDS = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
GRIDS_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}
EXAMPLES = (
    "v5p-8, v5p-64, v4-32, v5e-16 (or v5litepod-16), v6e-64, or a chip grid such as v5p:2x4x4"
)


@dataclasses.dataclass(frozen=True)
class Slice:
    generation: Generation
    grid: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def name(self) -> str:
        """The chip grid as libtpu names it, e.g. v5p:2x4x4."""
        return f"{self.generation.name}:{'x'.join(map(str, self.grid))}"

    @property
    def accelerator_type(self) -> str:
        return f"{self.generation.name}-{self.chips * self.generation.cores_per_name}"


def parse_topology(name: str) -> Slice:
    """`v5p-64` (gcloud's accelerator type: TensorCores for v4 / v5p, chips for v5e / v6e) or
    `v5p:2x4x4` (the chip grid) -> the slice."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip())
    if not match:
        raise UserError(f"unknown TPU topology {name!r}; use e.g. {EXAMPLES}")
    generation = GENERATIONS[ALIASES.get(match[1], match[1])]
    if match[2]:
        grid = _grid(generation, int(match[2]), name)
    else:
        grid = tuple(int(size) for size in match[3].split("x"))
        if len(grid) != generation.grid_dims or 0 in grid:
            raise UserError(
                f"topology {name!r}: a {generation.name} chip grid has {generation.grid_dims} "
                f"positive sizes, e.g. {Slice(generation, _grid(generation, 64, name)).name}"
            )
    chosen = Slice(generation, grid)
    if chosen.chips > generation.max_chips:
        raise UserError(
            f"topology {name!r}: {chosen.chips} chips, but a {generation.name} slice has at most "
            f"{generation.max_chips}; use e.g. {EXAMPLES}"
        )
    return chosen


def _grid(generation: Generation, cores: int, name: str) -> tuple[int, ...]:
    chips, odd = divmod(cores, generation.cores_per_name)
    if generation.grid_dims == 2:
        grid = GRIDS_2D.get(chips) if not odd else None
    elif odd or not (chips in SMALL_3D_GRIDS or chips % 64 == 0):
        grid = None
    else:
        grid = SMALL_3D_GRIDS.get(chips) or tuple(4 * n for n in _most_cubic(chips // 64))
    if grid is None:
        n = generation.cores_per_name
        sizes = (
            ", ".join(f"{generation.name}-{c * n}" for c in GRIDS_2D)
            if generation.grid_dims == 2
            else f"{generation.name}-{4 * n}, -{8 * n}, -{16 * n}, -{32 * n} or a multiple of "
            f"-{64 * n}"
        )
        raise UserError(f"topology {name!r} is not a {generation.name} slice: use {sizes}")
    return grid


def _most_cubic(n: int) -> tuple[int, int, int]:
    """The factors a <= b <= c of n with the smallest c (then the smallest sum), as Cloud TPU
    shapes its slices of 4x4x4 cubes (e.g. 2 cubes: 1x1x2 -> 4x4x8)."""
    shapes = [
        (a, b, n // (a * b))
        for a in range(1, n + 1)
        for b in range(a, n + 1)
        if n % (a * b) == 0 and n // (a * b) >= b
    ]
    return min(shapes, key=lambda s: (s[2], sum(s)))


def topology_devices(chosen: Slice) -> list[Any]:
    """Compile-only devices of the slice, one per chip (v4 and v5p chips run as one megacore)."""
    options = {"chip_config_name": "megacore"} if chosen.generation.cores_per_name == 2 else {}
    # Compile-only devices touch no TPU, so other processes may hold libtpu at the same time.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(
            platform="tpu", topology_name=chosen.name, **options
        ).devices
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise UserError(
                f"compile-check needs libtpu to compile for TPU: pip install {LIBTPU_PIN}"
            ) from None
        raise UserError(f"libtpu cannot describe {chosen.name}: {_first_line(e)}") from None


@contextlib.contextmanager
def libtpu_warnings_hidden() -> Iterator[None]:
    """Holds back what C++ writes to file descriptor 2 inside the block, then writes it out less
    libtpu's warnings that no TPU is attached here (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES)
    with the source-location lines that follow them. Anything else, error or not, is kept."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            sys.stderr.write(without_no_tpu_warnings(held.read().decode(errors="replace")))
            sys.stderr.flush()


NO_TPU_WARNINGS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "Logging before InitGoogle")


def without_no_tpu_warnings(text: str) -> str:
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        trace = line.startswith("=== Source Location Trace") or re.match(r"\S+\.cc:\d+\s*$", line)
        dropping = any(w in line for w in NO_TPU_WARNINGS) or (dropping and bool(trace))
        if not dropping:
            kept.append(line)
    return "".join(kept)


def abstract_batch(config: Config, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch, sharded as `Trainer.global_batch` shards it."""
    batch = {}
    for key, value in padding_row(config).items():
        shape = (config.train.batch_size, *np.shape(value))
        sharding = batch_sharding(mesh, config.mesh.rules, shape)
        batch[key] = jax.ShapeDtypeStruct(shape, np.asarray(value).dtype, sharding=sharding)
    return batch


def compile_check(config: Config, chosen: Slice) -> dict[str, Any]:
    """Compiles the config's train step for the slice; returns the report (see module doc)."""
    with libtpu_warnings_hidden():
        devices = topology_devices(chosen)
        mesh = config.mesh.make(devices)
        trainer = Trainer(config, mesh)
        start = time.perf_counter()
        try:
            compiled = trainer.compile(trainer.abstract, abstract_batch(config, mesh))
            memory = memory_per_chip(compiled, chosen.generation)
        except jax.errors.JaxRuntimeError as e:
            memory = out_of_memory(e)
        seconds = time.perf_counter() - start
    return {
        "topology": chosen.accelerator_type,
        "chip_grid": chosen.name,
        "chips": chosen.chips,
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "batch_size": config.train.batch_size,
        "seq_len": config.data.seq_len,
        "micro_batches": config.train.micro_batches,
        "attention": config.model.attention,
        "remat": config.model.remat,
        "optimizer": config.optimizer.name,
        "compile_seconds": round(seconds, 1),
        "memory_per_chip": memory,
        "estimate": roofline(config, trainer, chosen),
    }


def memory_per_chip(compiled: jax.stages.Compiled, generation: Generation) -> dict[str, Any]:
    stats = compiled.memory_analysis()
    sizes = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,  # donated arguments reused as outputs
        "temporaries": stats.temp_size_in_bytes,
        "generated_code": stats.generated_code_size_in_bytes,
    }
    total = (
        sizes["arguments"]
        + sizes["outputs"]
        - sizes["aliased"]
        + sizes["temporaries"]
        + sizes["generated_code"]
    )
    hbm = int(generation.hbm_gib * GIB)
    return {**sizes, "total": total, "hbm": hbm, "fits": total <= hbm}


def out_of_memory(error: jax.errors.JaxRuntimeError) -> dict[str, Any]:
    """The TPU compiler refuses a program that needs more HBM than it may use (a little less than
    the data sheet's); its message says how much the program needs and how much there is."""
    message = _first_line(error)
    figures = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
    if "RESOURCE_EXHAUSTED" not in message or not figures:
        raise error
    total, hbm = (int(float(size) * GIB) for size in figures.groups())
    return {"total": total, "hbm": hbm, "fits": False, "compiler_error": message}


def full_row_attention_pairs(seq_len: int, span: int) -> int:
    """Query-key pairs of one full row: the token at position p attends min(p + 1, span) keys."""
    if span >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return span * (span + 1) // 2 + (seq_len - span) * span


def extra_layer_passes(config: Config) -> tuple[int, int]:
    """(forwards, backwards) of the layer stack beyond one of each: `model.remat: full` runs
    the forward again; a fused optimizer's walk always does, and with `optimizer.grad_clip` it
    walks twice (train/fused.py)."""
    if config.optimizer.name in FUSED_OPTIMIZERS:
        return (2, 1) if config.optimizer.grad_clip else (1, 0)
    return (1, 0) if config.model.remat == "full" else (0, 0)


def recomputed_flops(config: Config, tokens: float, pairs: float) -> float:
    """FLOPs of the layer passes beyond one forward and one backward (`extra_layer_passes`),
    or of the attention products (batched matmuls) that `dots_no_batch` recomputes."""
    model = config.model
    forward = train_flops(model, tokens, pairs, lm_head=False) / 3
    forwards, backwards = extra_layer_passes(config)
    if forwards:
        return (forwards + 2 * backwards) * forward
    if model.remat == "dots_no_batch":
        return train_flops(model, 0, pairs, lm_head=False) / 3
    return 0.0


def collective_bytes(config: Config, trainer: Trainer) -> dict[str, float]:
    """Bytes each chip receives per step over ICI (see the module doc for what is counted)."""
    mesh = trainer.mesh
    data, fsdp, context, tensor = (
        mesh.shape[axis] for axis in ("data", "fsdp", "context", "tensor")
    )
    parts = config.train.micro_batches

    def shard_bytes(leaf: jax.ShapeDtypeStruct) -> int:
        return math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize

    def gathered_from(leaf: jax.ShapeDtypeStruct) -> int:
        """How many chips (over fsdp and context) hold a piece of this parameter."""
        axes = set(jax.tree.leaves(tuple(leaf.sharding.spec)))
        return math.prod(mesh.shape[axis] for axis in axes & {"fsdp", "context"})

    params = jax.tree.leaves((trainer.abstract.trainable, trainer.abstract.frozen))
    trainable = jax.tree.leaves(trainer.abstract.trainable)
    forwards, backwards = extra_layer_passes(config)
    gathers = (2 + backwards) * parts * sum((gathered_from(p) - 1) * shard_bytes(p) for p in params)
    scatters = (
        (1 + backwards) * parts * sum((gathered_from(p) - 1) * shard_bytes(p) for p in trainable)
    )
    data_reduce = (
        2 * (1 + backwards) * parts * (data - 1) / data * sum(shard_bytes(p) for p in trainable)
    )

    model = config.model
    itemsize = np.dtype(model.dtype).itemsize
    rows_per_group = config.train.batch_size / (data * fsdp)
    tokens_per_chip = rows_per_group * config.data.seq_len / context
    activation = tokens_per_chip * model.hidden_size * itemsize
    reduces_per_layer = 4 + 2 * (forwards + backwards)
    tensor_reduce = model.num_layers * reduces_per_layer * 2 * (tensor - 1) / tensor * activation
    # Context: each layer gathers the row's keys and values forward (again when remat: full
    # recomputes it) and reduce-scatters their gradients backward.
    kv_bytes = 2 * rows_per_group * config.data.seq_len * model.num_kv_heads * model.head_dim
    kv_passes = 2 + forwards + backwards
    context_kv = model.num_layers * kv_passes * (context - 1) / context * kv_bytes * itemsize
    return {
        "fsdp_gather": float(gathers),
        "fsdp_reduce_scatter": float(scatters),
        "data_all_reduce": float(data_reduce),
        "tensor_all_reduce": float(tensor_reduce),
        "context_kv_gather": float(context_kv / tensor),
    }


def roofline(config: Config, trainer: Trainer, chosen: Slice) -> dict[str, Any]:
    generation = chosen.generation
    tokens = config.train.batch_size * config.data.seq_len
    span = attention_span(config.data)
    pairs = config.train.batch_size * full_row_attention_pairs(config.data.seq_len, span)
    model_flops = train_flops(config.model, tokens, pairs, config.objective == "codepmp")
    recomputed = recomputed_flops(config, tokens, pairs)
    peak = PEAK_FLOPS[generation.device_kind]
    stages, parts = trainer.stages, config.train.micro_batches
    bubble = (parts + stages - 1) / parts  # every stage computes in every tick of the pipeline
    compute_seconds = bubble * (model_flops + recomputed) / (chosen.chips * peak)
    received = collective_bytes(config, trainer)
    collective_seconds = sum(received.values()) / (generation.ici_bytes_per_s / 2)
    step_seconds = compute_seconds + collective_seconds
    return {
        "tokens": tokens,
        "attention_span": span,
        "attention_pairs": pairs,
        "model_flops": model_flops,
        "recomputed_flops": recomputed,
        "peak_flops_per_chip": peak,
        "compute_seconds": compute_seconds,
        "pipeline_bubble": bubble,
        "collective_bytes_per_chip": received,
        "ici_bytes_per_s": generation.ici_bytes_per_s,
        "collective_seconds": collective_seconds,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds,
        "mfu": model_flops / (step_seconds * chosen.chips * peak),
        "assumptions": ASSUMPTIONS,
    }


ASSUMPTIONS = [
    "every row full: batch_size x seq_len tokens, each attending min(position + 1, span) keys",
    "matmuls at the chip's bf16 peak whatever model.dtype; HBM-bound work (norms, softmax, "
    "optimizer) not counted",
    "collectives not overlapped with compute, received over all ICI links at once "
    "(half the bidirectional bandwidth)",
    "per micro-batch: FSDP gathers parameters (in param_dtype) forward and backward and "
    "reduce-scatters gradients; tensor all-reduces activations 2x per layer forward, 2x backward, "
    "2x more with remat full; context gathers each layer's keys and values forward (again "
    "with remat full) and reduce-scatters their gradients",
    "pipeline stages: compute x (micro_batches + stages - 1) / micro_batches (the bubble); the "
    "stage-to-stage sends and the embedding and heads each stage group repeats are not counted",
    "lomo / adalomo: the backward walk recomputes each layer's forward (as remat full); with "
    "grad_clip it walks twice, repeating the recompute, the backward and their collectives",
]


def format_report(report: dict[str, Any], config_path: str) -> str:
    mesh = describe(report["mesh"])
    lines = [
        f"{config_path} on {report['topology']} ({report['chip_grid']}: {report['chips']} chips, "
        f"{report['device_kind']})",
        f"mesh {mesh}; batch {report['batch_size']} rows x {report['seq_len']} tokens, "
        f"{report['micro_batches']} micro-batch(es); attention {report['attention']}, "
        f"remat {report['remat']}, optimizer {report['optimizer']}",
        f"compile time {report['compile_seconds']:.1f} s",
        "",
        *_memory_lines(report["memory_per_chip"]),
        "",
        *_estimate_lines(report["estimate"], report["chips"]),
    ]
    return "\n".join(lines)


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    share = f"{100 * memory['total'] / memory['hbm']:.3g} % of {_bytes(memory['hbm'])} HBM"
    if "compiler_error" in memory:
        return [
            "memory per chip: the TPU compiler refused the step",
            f"  {memory['compiler_error']}",
            f"  total           {_bytes(memory['total']):>11}  DOES NOT FIT: {share}",
        ]
    verdict = "fits" if memory["fits"] else "DOES NOT FIT"
    return [
        "memory per chip (XLA memory_analysis of the compiled step)",
        f"  arguments       {_bytes(memory['arguments']):>11}",
        f"  outputs         {_bytes(memory['outputs']):>11}",
        f"  aliased         {_bytes(-memory['aliased']):>11}  donated arguments reused as outputs",
        f"  temporaries     {_bytes(memory['temporaries']):>11}",
        f"  generated code  {_bytes(memory['generated_code']):>11}",
        f"  total           {_bytes(memory['total']):>11}  {verdict}: {share}",
    ]


def _estimate_lines(estimate: dict[str, Any], chips: int) -> list[str]:
    received = estimate["collective_bytes_per_chip"]
    parts = ", ".join(f"{name} {_bytes(size)}" for name, size in received.items() if size)
    return [
        "step time: an ESTIMATE from a roofline, not a measurement",
        f"  model FLOPs     {estimate['model_flops']:>11.3e}  {estimate['tokens']} tokens, "
        f"{estimate['attention_pairs']:.3e} attention pairs (span {estimate['attention_span']})",
        f"  + recomputed    {estimate['recomputed_flops']:>11.3e}  layer passes repeated (remat, fused walk)",
        f"  compute         {_seconds(estimate['compute_seconds']):>11}  at "
        f"{estimate['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s (bf16 peak) x {chips} chips",
        f"  collectives     {_seconds(estimate['collective_seconds']):>11}  "
        f"{_bytes(sum(received.values()))} in per chip at "
        f"{estimate['ici_bytes_per_s'] / 2e9:.0f} GB/s ({parts or 'none'})",
        f"  step            {_seconds(estimate['step_seconds']):>11}  "
        f"{estimate['tokens_per_second']:.3g} tokens/s, MFU at most {100 * estimate['mfu']:.0f} %",
        "  assuming:",
        *(f"  - {assumption}" for assumption in estimate["assumptions"]),
    ]


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _seconds(s: float) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s * 1e6:.3g} us"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `jaxrm compile-check CONFIG.yaml [key=value ...] --topology NAME [--json]`."""
    check = commands.add_parser(
        "compile-check",
        help="compile the train step for a TPU slice (no TPU needed): memory and a step-time "
        "estimate",
        description=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("config", metavar="CONFIG.yaml")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.add_argument(
        "--topology",
        required=True,
        metavar="NAME",
        help=f"the TPU slice: {EXAMPLES}",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(run=cmd_compile_check)


def cmd_compile_check(args: argparse.Namespace) -> None:
    chosen = parse_topology(args.topology)
    config = load_config(args.config, args.overrides)
    report = compile_check(config, chosen)
    if args.json:
        print(json.dumps({"config": args.config, **report}, indent=2))
    else:
        print(format_report(report, args.config))
    memory = report["memory_per_chip"]
    if not memory["fits"]:
        limit = "the TPU compiler may use" if "compiler_error" in memory else "of a chip"
        raise UserError(
            f"{args.config} does not fit {report['topology']}: {_bytes(memory['total'])} per chip, "
            f"{_bytes(memory['total'] - memory['hbm'])} more than the {_bytes(memory['hbm'])} of "
            f"{chosen.generation.name} HBM {limit}"
        )
