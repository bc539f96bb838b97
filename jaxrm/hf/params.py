"""Parameter trees <-> HF tensors, by walking the layout table (`hf/layouts.py`).

Import streams: each stacked parameter is allocated in its target sharding and filled layer by
layer, so beside the finished parameters the host holds one layer's tensors at a time. Export
gathers one parameter at a time to the host and hands its tensors to the sharded writer.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxrm.errors import UserError
from jaxrm.hf.layouts import Link
from jaxrm.hf.weight_files import ShardedWriter, WeightReader

# Tensors that carry no parameters of ours and may be left behind.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_params(
    reader: WeightReader,
    table: Sequence[Link],
    abstract: dict,
    num_layers: int,
    where: str,
) -> dict:
    """Pure dict of parameters, each placed in the sharding of its `abstract` ShapeDtypeStruct.

    A stacked parameter is allocated on the devices first and filled one layer at a time, so the
    host holds one layer's tensors, never a whole stack. Every tensor's shape is checked from the
    file headers before the first is allocated.
    """
    check_shapes(reader, table, num_layers)
    params: dict = {}
    count = sum(len(link.hf) * (num_layers if link.per_layer else 1) for link in table)
    progress = tqdm(total=count, desc="import", unit="tensor", disable=None)
    for link in table:
        targets = [_get(abstract, path) for path in link.params]
        if link.per_layer:
            stacks = [_zeros(target) for target in targets]
            for i in range(num_layers):
                names = [name.format(i=i) for name in link.hf]
                tensors = [_finite(reader.read(name), name, where) for name in names]
                values = link.to_jax(tensors)
                for j, (value, target) in enumerate(zip(values, targets, strict=True)):
                    stacks[j] = _set_layer(stacks[j], i, np.asarray(value, target.dtype))
                progress.update(len(link.hf))
                del tensors, values
        else:
            values = link.to_jax([_finite(reader.read(name), name, where) for name in link.hf])
            stacks = [
                place_on_device(np.asarray(value, target.dtype), target)
                for value, target in zip(values, targets, strict=True)
            ]
            progress.update(len(link.hf))
            del values
        for path, stack in zip(link.params, stacks, strict=True):
            _set(params, path, stack)
    progress.close()
    return params


def _finite(tensor: np.ndarray, name: str, where: str) -> np.ndarray:
    """`tensor`, if every value is finite: a NaN or inf weight would make every reward NaN."""
    if not np.isfinite(np.asarray(tensor, np.float32)).all():
        raise UserError(f"{where}: tensor '{name}' holds NaN or infinite values")
    return tensor


def _zeros(target: jax.ShapeDtypeStruct) -> jax.Array:
    sharding = getattr(target, "sharding", None)
    return jax.jit(lambda: jax.numpy.zeros(target.shape, target.dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, i: int, value: jax.Array) -> jax.Array:
    return stack.at[i].set(value)


def place_on_device(host: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def check_shapes(reader: WeightReader, table: Sequence[Link], num_layers: int) -> None:
    """Every tensor `table` reads is in the files with the shape config.json implies: checked
    from the headers alone, before anything is allocated or read."""
    for link in table:
        for i in range(num_layers) if link.per_layer else [None]:
            for name, want in zip(link.hf, link.shapes, strict=True):
                name = name.format(i=i)
                got = reader.shape(name)
                if got != want:
                    raise UserError(
                        f"{reader.path(name)}: tensor '{name}' has shape {list(got)}, but "
                        f"config.json implies {list(want)}"
                    )


def unused_tensors(reader: WeightReader, table: Sequence[Link], num_layers: int) -> list[str]:
    used = {name.format(i=i) for link in table for name in link.hf for i in range(num_layers)}
    return [n for n in reader.names() if n not in used and not n.endswith(_IGNORED_SUFFIXES)]


def write_params(
    params: dict, table: Sequence[Link], writer: ShardedWriter | None, num_layers: int, dtype: Any
) -> None:
    """Converts and writes every linked tensor; every process gathers, only one with a writer writes."""
    for link in tqdm(table, desc="export", unit="parameter", disable=None):
        arrays = [to_host(_get(params, path)) for path in link.params]
        if writer is None:
            continue
        for i in range(num_layers) if link.per_layer else [None]:
            values = [a[i] for a in arrays] if i is not None else arrays
            for name, tensor in zip(link.hf, link.to_hf(values), strict=True):
                writer.add(name.format(i=i), tensor.astype(dtype))


def to_host(array: jax.Array | np.ndarray) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array on this host."""
    if isinstance(array, np.ndarray) or array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
