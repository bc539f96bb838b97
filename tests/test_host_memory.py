"""Keeping freed host memory: a block allocated again after a free must not page-fault again."""

import subprocess
import sys

from jaxrm.train import host_memory

# Page faults of the second of two malloc-fill-free rounds of 256 MB, as XLA:CPU allocates a step's
# temporaries (numpy would not do: it asks for huge pages itself).
SECOND_FILL_FAULTS = """
import ctypes, resource
from jaxrm.train.host_memory import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def fill():
    block = libc.malloc(1 << 28)
    ctypes.memset(block, 1, 1 << 28)
    libc.free(block)

fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_fill(env: dict) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", SECOND_FILL_FAULTS], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    return kept, int(faults)


def test_freed_memory_is_reused_without_page_faults():
    kept, faults = second_fill({"PATH": "/usr/bin:/bin"})
    assert kept == "True"
    assert faults < 1000  # 65536 pages of 4 KB when the block goes back to the kernel


def test_the_opt_out_leaves_malloc_as_it_was():
    kept, faults = second_fill({"PATH": "/usr/bin:/bin", host_memory.OPT_OUT_ENV: "0"})
    assert kept == "False"
    assert faults > 60000


def test_hosts_with_an_accelerator_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/accel0"])
    assert host_memory.keep_freed_memory() is False
