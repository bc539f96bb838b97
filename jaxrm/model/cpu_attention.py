"""Flash attention on CPU: a C++ kernel (jaxrm/model/kernels/cpu_flash_attention.cc) called through
`jax.ffi`, compiled on first use with the machine's C++ compiler and cached.

    out = flash_attention(q, k, v, segment_ids, prefix_ids)   # as attention.attention_mask says

XLA:CPU runs attention as small batched matmuls and separate softmax passes over tiles that do
not fit in cache (benchmarks/RESULTS.md); the kernel keeps each 64 x 64 block from the scores to
the output. It is compiled for this machine's CPU (-march=native) into JAXRM_KERNEL_CACHE
(default ~/.cache/jaxrm/kernels), one file per source, compiler and jaxlib version.
"""

import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import platform
import shlex
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
FLAGS = ("-O3", NATIVE, "-ffast-math", "-std=c++17", "-fPIC")
# Under jax.vmap every operand gets the mapped axis in front, and the kernel folds all leading
# axes into its batch.
VMAP_METHOD = "broadcast_all"
TARGETS = {"jaxrm_flash_forward": "JaxrmFlashForward", "jaxrm_flash_backward": "JaxrmFlashBackward"}


def _source() -> bytes:
    return (
        importlib.resources.files("jaxrm.model") / "kernels" / "cpu_flash_attention.cc"
    ).read_bytes()


def _cpu_flags() -> bytes:
    """-march=native depends on the CPU: a cache shared between machines keys on its features
    (x86 "flags", ARM "Features")."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    features = (line for line in lines if line.startswith(("flags", "Features")))
    return next(features, platform.processor()).encode()


def _compiler() -> list[str] | None:
    """The compiler command: CXX (which may carry arguments, "ccache g++"), else c++ or g++."""
    if os.environ.get(COMPILER_ENV):
        return shlex.split(os.environ[COMPILER_ENV])
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


def _build(compiler: list[str]) -> Path:
    source = _source()
    parts = [source, *map(str.encode, compiler), " ".join(FLAGS).encode()]
    key = hashlib.sha256(b"\0".join([*parts, jaxlib.__version__.encode(), _cpu_flags()]))
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxrm" / "kernels")
    library = cache / f"cpu_flash_attention-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        source_path, built = Path(work) / "kernel.cc", Path(work) / library.name
        source_path.write_bytes(source)
        objects = f"{source_path}.o"
        # Compiled and linked apart: -ffast-math at link time would add crtfastmath.o, which
        # turns on flush-to-zero for the whole process when the library loads.
        include = f"-I{jax.ffi.include_dir()}"
        steps = [
            [*compiler, *FLAGS, include, "-c", str(source_path), "-o", objects],
            [*compiler, "-shared", objects, "-o", str(built)],
        ]
        for command in steps:
            logger.info("building the CPU flash-attention kernel: %s", " ".join(command))
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "error" in line]
                first = (errors or done.stderr.splitlines() or [""])[0]
                raise RuntimeError(f"{compiler[0]} exited {done.returncode}: {first}")
        os.replace(built, library)  # atomic: concurrent builders each write a whole file
    return library


def _load(library: Path) -> None:
    loaded = ctypes.CDLL(str(library))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu"
        )


@functools.cache
def available() -> bool:
    """Builds (once per machine) and registers the kernel; False, with a warning, where no C++
    compiler can build it (attention then runs as einsums, about 3x slower). A cached library
    that does not load (torn, or built against another libstdc++) is built again."""
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C++ compiler (set CXX): CPU attention runs without its flash kernel")
        return False
    try:
        library = _build(compiler)
        try:
            _load(library)
        except OSError:
            library.unlink(missing_ok=True)
            _load(_build(compiler))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning(
            "CPU attention runs without its flash kernel, which did not build or load: %s", error
        )
        return False
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
        vmap_method=VMAP_METHOD,
    )(q, k, v, segment_ids, prefix_ids, scale=np.float32(scale))
    return out, (q, k, v, segment_ids, prefix_ids, out, lse)


def _flash_bwd(scale: float, residuals: tuple, grad: Array) -> tuple:
    q, k, v, segment_ids, prefix_ids, out, lse = residuals
    dq, dk, dv = jax.ffi.ffi_call(
        "jaxrm_flash_backward",
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
        vmap_method=VMAP_METHOD,
    )(q, k, v, segment_ids, prefix_ids, out, lse, grad, scale=np.float32(scale))
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
