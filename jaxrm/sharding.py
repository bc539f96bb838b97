"""Parallelism as data: a device mesh (`data`, `fsdp`, `tensor`) and logical-axis rules.

Every parameter and constrained activation names its dimensions with logical axes (`embed`,
`mlp`, `heads`, ...). A rules table maps each logical axis to zero, one or several mesh axes, so
changing how a model is split is a config change (`mesh.*`), never a code change.

A mesh axis that does not divide a dimension is dropped from that dimension (the dimension is
replicated instead), so every preset runs on every mesh shape; a mesh axis is used at most once
per array.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | list[str] | None]

DEFAULT_RULES: dict[str, str | list[str] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "score": None,
    # activations
    "batch": ["data", "fsdp"],
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves a -1 entry to the devices left over and checks the product."""
    sizes = [data, fsdp, tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise UserError(
                f"mesh: {num_devices} devices cannot be split with "
                f"data={data} fsdp={fsdp} tensor={tensor}"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise UserError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"devices, but {num_devices} are available"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A mesh over `devices` (default: all) with axes data x fsdp x tensor."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)
    except NotImplementedError:  # a TPU torus: each mesh axis must be whole sides of it
        raise UserError(
            f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} does not map onto this "
            "TPU slice's torus: each mesh axis must be a product of whole torus sides (e.g. "
            "4 or 8 on a 4x8 slice, not 2 or 16)"
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


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


def batch_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding for a batch array [rows, ...]: rows split by the `batch` rule."""
    return named_sharding(("batch", *[None] * (len(shape) - 1)), shape, rules, mesh)
