"""A checksum of every saved array, so a checkpoint damaged after it was written is never used.

Each array's words are summed twice on the devices that hold it: plainly, and each word weighted
by its position. Integer sums wrap exactly in any order, so the checksum of an array is the same
on every mesh it is restored onto, and computing it costs one read of the array in device memory
(no host copy, no gather). A flipped, zeroed or moved word changes it.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.errors import UserError

_MIX = np.uint32(2654435761)  # Knuth's multiplicative hash constant: spreads positions


class DamagedCheckpoint(UserError):
    """A checkpoint whose files cannot be read or whose arrays differ from what was saved."""


def checksums(tree: Any) -> dict[str, dict]:
    """{path: {"dtype", "shape", "sum"}} of every array in `tree` (a pytree of jax arrays)."""
    leaves = _arrays(tree)
    sums = jax.device_get(_sums([leaf for _, leaf in leaves]))
    return {
        path: {
            "dtype": str(leaf.dtype),
            "shape": list(leaf.shape),
            "sum": f"{int(a):08x}{int(b):08x}",
        }
        for (path, leaf), (a, b) in zip(leaves, sums, strict=True)
    }


def verify(saved: dict[str, dict], tree: Any, where: str) -> None:
    """Raises DamagedCheckpoint naming the first array of `tree` whose checksum differs from
    `saved` (arrays restored into another dtype or shape are not compared)."""
    restored = checksums(tree)
    for path, expected in saved.items():
        found = restored.get(path)
        if found is None or (found["dtype"], found["shape"]) != (
            expected["dtype"],
            expected["shape"],
        ):
            continue
        if found["sum"] != expected["sum"]:
            raise DamagedCheckpoint(
                f"{where}: array {path} differs from what was saved (checksum {found['sum']}, "
                f"saved {expected['sum']}); the checkpoint is damaged"
            )


def _arrays(tree: Any) -> list[tuple[str, jax.Array]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        (jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
        for path, leaf in flat
        if isinstance(leaf, jax.Array)
    ]


@jax.jit
def _sums(arrays: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    return [_sum(x) for x in arrays]


def _sum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    words = _words(x)
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the row-major position, without a reshape
        position += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride)
        stride = (stride * words.shape[axis]) % 2**32
    weights = position * _MIX + np.uint32(1)
    return jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32, one per element (8-byte elements: two)."""
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
