import os

# Eight fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# As the `jaxrm` command does: XLA:CPU's per-step temporaries are reused instead of page-faulted in
# again each call (jaxrm/host_memory.py); must run before JAX starts its CPU backend.
from jaxrm.train.host_memory import keep_freed_memory

keep_freed_memory()
