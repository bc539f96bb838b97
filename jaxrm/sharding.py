"""Parallelism as data: a device mesh (`stage`, `data`, `fsdp`, `context`, `tensor`) and
logical-axis rules.

Every parameter and constrained activation names its dimensions with logical axes (`embed`,
`mlp`, `heads`, ...). A rules table maps each logical axis to zero, one or several mesh axes, so
changing how a model is split is a config change (`mesh.*`), never a code change.

A mesh axis that does not divide a dimension is dropped from that dimension (the dimension is
replicated instead), so every preset runs on every mesh shape; a mesh axis is used at most once
per array.

`stage` places contiguous blocks of layers on different devices (pipeline stages,
`jaxrm.model.pipeline`); it is the outermost axis, the one that may cross slower links.

`context` splits each packed row's tokens (the `length` activations) over devices: attention
gathers the keys and values along it (`jaxrm.model.attention`), and parameters are sharded over it
as over `fsdp`, so a context group holds one copy of the model between them.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrm.errors import UserError

MESH_AXES = ("stage", "data", "fsdp", "context", "tensor")

Rules = Mapping[str, str | list[str] | None]

DEFAULT_RULES: dict[str, str | list[str] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": ["fsdp", "context"],
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": "stage",  # pipeline stages hold contiguous blocks of the layer stack
    "score": None,
    # activations
    "stages": "stage",
    "batch": ["data", "fsdp"],
    "length": "context",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Mesh axis sizes (by name, missing ones 1) with a -1 entry resolved to the devices left
    over; checks the product."""
    sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    fixed = math.prod(n for n in sizes.values() if n != -1)
    free = [axis for axis, n in sizes.items() if n == -1]
    if free:
        if num_devices % fixed:
            raise UserError(f"mesh: {num_devices} devices cannot be split with {describe(sizes)}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise UserError(
            f"mesh: {describe(sizes)} = {math.prod(sizes.values())} devices, but {num_devices} are "
            "available"
        )
    return sizes


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[Any] | None = None,
    context: int = 1,
    stage: int = 1,
) -> Mesh:
    """A mesh over `devices` (default: all) with axes stage x data x fsdp x context x tensor."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(
        {"stage": stage, "data": data, "fsdp": fsdp, "context": context, "tensor": tensor},
        len(devices),
    )
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)
    except NotImplementedError:  # a TPU torus: each mesh axis must be whole sides of it
        raise UserError(
            f"mesh {describe(sizes)} does not map onto this TPU slice's torus: each mesh axis must be a "
            "product of whole torus sides (e.g. 4 or 8 on a 4x8 slice, not 2 or 16)"
        ) from None


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh
) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dimensions are called `names`."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        target = rules.get(name) if name is not None else None
        axes = [target] if isinstance(target, str) else list(target or [])
        kept = []
        for axis in axes:
            width = mesh.shape[axis]
            if (
                axis in used
                or width == 1
                or size % (math.prod(mesh.shape[a] for a in kept) * width)
            ):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*spec)


def named_sharding(
    names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, rules, mesh))


def tree_shardings(abstract_state: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedShardings for an NNX state whose Variables carry `out_sharding` axis names."""
    from flax import nnx

    def one(variable: Any) -> NamedSharding:
        names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        return named_sharding(names, variable.shape, rules, mesh)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxrm_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this block, `constrain` pins activations to `mesh` by `rules`.

    The constraints are layout hints read at trace time: trace (first-call) the jitted functions
    inside the block. Outside any block `constrain` does nothing, which changes speed, not values.
    """
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `activation_sharding` block, if any."""
    return _ACTIVE.get()


def target_platform() -> str:
    """The platform being compiled for: the active mesh's (an ahead-of-time TPU compile on a CPU
    host has a mesh of TPU devices), else the default backend."""
    active = _ACTIVE.get()
    return active[0].devices.flat[0].platform if active else jax.default_backend()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, rules, mesh))


def describe(sizes: Mapping[str, int]) -> str:
    """Mesh axis sizes (a mesh's `shape`) as "data=1 x fsdp=8 x ..." (`stage` only when
    pipelining)."""
    return " x ".join(
        f"{name}={size}" for name, size in sizes.items() if name != "stage" or size != 1
    )


def batch_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding for a batch array [rows, ...]: rows split by the `batch` rule."""
    return named_sharding(("batch", *[None] * (len(shape) - 1)), shape, rules, mesh)


def local_rows(mesh: Mesh, rules: Rules, rows: int) -> set[int]:
    """The rows of a [rows, ...] batch that this process's devices hold."""
    sharding = batch_sharding(mesh, rules, (rows,))
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map((rows,)).values():
        held.update(range(rows)[index[0]])
    return held


def split_rows(x: jax.Array, parts: int) -> jax.Array:
    """[rows, ...] -> [parts, rows / parts, ...], each part taking rows from every device."""
    return x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1)


def merge_rows(x: jax.Array) -> jax.Array:
    """[parts, rows / parts, ...] -> [rows, ...], the inverse of `split_rows`."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
