"""Flash attention on CPU: a C++ kernel (jaxrm/kernels/cpu_flash_attention.cc) called through
`jax.ffi`, compiled on first use with the machine's C++ compiler and cached.

    out = flash_attention(q, k, v, segment_ids, prefix_ids)   # as attention.attention_mask says

XLA:CPU runs attention as small batched matmuls and separate softmax passes over tiles that do
not fit in cache (benchmarks/RESULTS.md); the kernel keeps each 64 x 64 block from the scores to
the output. It is compiled for this machine's CPU (-march=native) into JAXRM_KERNEL_CACHE
(default ~/.cache/jaxrm/kernels), one file per source, compiler and jaxlib version.
"""

import functools
import hashlib
import importlib.resources
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

Array = jax.Array
logger = logging.getLogger(__name__)

BLOCK = 64  # the kernel's BLOCK: lengths are padded to a multiple of it
LANES = 16  # head_dim is padded to a multiple of the kernel's 16-float micro-tiles
CACHE_ENV = "JAXRM_KERNEL_CACHE"
COMPILER_ENV = "CXX"
NATIVE = "-mcpu=native" if platform.machine() in ("arm64", "aarch64") else "-march=native"
FLAGS = ("-O3", NATIVE, "-ffast-math", "-std=c++17", "-shared", "-fPIC")
TARGETS = {"jaxrm_flash_forward": "JaxrmFlashForward", "jaxrm_flash_backward": "JaxrmFlashBackward"}


def _source() -> bytes:
    return (importlib.resources.files("jaxrm") / "kernels" / "cpu_flash_attention.cc").read_bytes()


def _cpu_flags() -> bytes:
    """-march=native depends on the CPU: a cache shared between machines keys on its flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    return next((line.encode() for line in lines if line.startswith("flags")), b"")


def _compiler() -> str | None:
    return os.environ.get(COMPILER_ENV) or shutil.which("c++") or shutil.which("g++")


def _build(compiler: str) -> Path:
    source = _source()
    parts = [source, compiler.encode(), " ".join(FLAGS).encode(), jaxlib.__version__.encode()]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_flags()])).hexdigest()[:16]
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxrm" / "kernels")
    library = cache / f"cpu_flash_attention-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        source_path = Path(work) / "cpu_flash_attention.cc"
        source_path.write_bytes(source)
        built = Path(work) / library.name
        command = [
            compiler,
            *FLAGS,
            f"-I{jax.ffi.include_dir()}",
            str(source_path),
            "-o",
            str(built),
        ]
        logger.info("compiling the CPU flash-attention kernel: %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            raise RuntimeError(f"{compiler} exited {done.returncode}: {(errors or [''])[0]}")
        os.replace(built, library)  # atomic: concurrent builders each write a whole file
    return library


@functools.cache
def available() -> bool:
    """Builds (once per machine) and registers the kernel; False, with a warning, where no C++
    compiler can build it (attention then runs as einsums, about 3x slower)."""
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C++ compiler (set CXX): CPU attention runs without its flash kernel")
        return False
    try:
        library = _build(compiler)
    except (OSError, RuntimeError) as error:
        logger.warning(
            "CPU attention runs without its flash kernel, which did not build: %s", error
        )
        return False
    import ctypes

    loaded = ctypes.CDLL(str(library))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu"
        )
    return True


def flash_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, prefix_ids: Array | None = None
) -> Array:
    """q [batch, length, heads, dim], k and v [batch, length, kv_heads, dim]; computes in float32
    and returns q's dtype. Call `available()` first."""
    _, t, _, d = q.shape
    length, dim = -(-t // BLOCK) * BLOCK, -(-d // LANES) * LANES
    prefix_ids = jnp.zeros_like(segment_ids) if prefix_ids is None else prefix_ids

    def pad(x: Array) -> Array:
        x = x.astype(jnp.float32)
        return jnp.pad(x, ((0, 0), (0, length - t), (0, 0), (0, dim - d)))

    ids = [
        jnp.pad(x.astype(jnp.int32), ((0, 0), (0, length - t))) for x in (segment_ids, prefix_ids)
    ]
    out = _flash(pad(q), pad(k), pad(v), *ids, d**-0.5)
    return out[:, :t, :, :d].astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(
    q: Array, k: Array, v: Array, segment_ids: Array, prefix_ids: Array, scale: float
) -> Array:
    return _flash_fwd(q, k, v, segment_ids, prefix_ids, scale)[0]


def _flash_fwd(
    q: Array, k: Array, v: Array, segment_ids: Array, prefix_ids: Array, scale: float
) -> tuple[Array, tuple]:
    b, t, n, _ = q.shape
    out, lse = jax.ffi.ffi_call(
        "jaxrm_flash_forward",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
    )(q, k, v, segment_ids, prefix_ids, scale=np.float32(scale))
    return out, (q, k, v, segment_ids, prefix_ids, out, lse)


def _flash_bwd(scale: float, residuals: tuple, grad: Array) -> tuple:
    q, k, v, segment_ids, prefix_ids, out, lse = residuals
    dq, dk, dv = jax.ffi.ffi_call(
        "jaxrm_flash_backward",
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
    )(q, k, v, segment_ids, prefix_ids, out, lse, grad, scale=np.float32(scale))
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
