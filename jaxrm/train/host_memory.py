"""Keeping freed host memory for reuse when XLA runs on the CPU.

XLA:CPU allocates a compiled step's temporaries afresh on every call (1.7 GB for the benchmark's
train step) and frees them after. glibc's malloc serves such large blocks with their own mmap and
gives them back to the kernel on free, so every step page-faults 1.7 GB in again and has the
kernel zero it: 0.9 s of kernel time a step, about a sixth of the step, on the 2-core machine
RESULTS.md describes. With one malloc arena, no mmap'd blocks and no trimming, freed memory stays
in the process and the next step reuses it; the process keeps its peak memory instead of
returning it between steps. As the heap fragments, it grows a few more times in the first steps
before it settles, with room for the temporaries about three times over (6.1 GB against 2.8 GB
for the benchmark's step).

The settings are process-wide and only hold for threads that allocate afterwards, so
`keep_freed_memory()` must run before JAX starts its CPU backend (the `jaxrm` command does it
first). It changes nothing on hosts with an accelerator device, where the step's temporaries live
in device memory and one arena would only make the input pipeline's threads wait on each other,
nor where `JAXRM_KEEP_FREED_MEMORY=0`.
"""

import ctypes
import glob
import os
import sys

OPT_OUT_ENV = "JAXRM_KEEP_FREED_MEMORY"
ACCELERATOR_DEVICES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")

# mallopt(3) parameters; trimming at -1 is "never" in glibc's own words.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse (see the module docstring); returns
    whether it did. Off Linux, without glibc, with an accelerator or with the opt-out, a no-op."""
    if os.environ.get(OPT_OUT_ENV) == "0" or not sys.platform.startswith("linux"):
        return False
    if any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl) or none by that name
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
