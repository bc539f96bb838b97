"""Matrix products whose backward pass XLA's CPU backend runs well.

    y = einsum("bte,ehd->bthd", x, kernel)       # as jnp.einsum, two operands
    y = dense(x, kernel)                          # x's last axis times the kernel's first

On CPU a weight gradient contracts the batch and length axes of the activations and the
gradient; left to autodiff, XLA transposes the 3-d activations for its matmul in a slow fused
loop (a third of a layer's weight-gradient time here). The backward below merges those leading
axes first, so the transpose is of a 2-d array. Elsewhere (TPU, GPU) these are plain `jnp.einsum`.
(An optimisation barrier on the incoming gradient, once used here, is removed by XLA:CPU before
fusion in jax 0.10.2: the compiled train step was identical with and without it.)
"""

import functools
import string

import jax
import jax.numpy as jnp

from jaxrm.sharding import target_platform

Array = jax.Array


def einsum(spec: str, a: Array, b: Array, preferred_element_type: jnp.dtype | None = None) -> Array:
    """`jnp.einsum(spec, a, b)` for specs whose every index appears in two of the three terms."""
    if target_platform() == "cpu":
        return _einsum_cpu(spec, preferred_element_type, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=preferred_element_type)


def dense(x: Array, kernel: Array, contract: int = 1) -> Array:
    """x's last `contract` axes times the kernel's first `contract` axes."""
    letters = iter(string.ascii_letters)
    batch = "".join(next(letters) for _ in range(x.ndim - contract))
    inner = "".join(next(letters) for _ in range(contract))
    out = "".join(next(letters) for _ in range(kernel.ndim - contract))
    return einsum(f"{batch}{inner},{inner}{out}->{batch}{out}", x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum_cpu(spec: str, preferred: jnp.dtype | None, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=preferred)


def _einsum_cpu_fwd(
    spec: str, preferred: jnp.dtype | None, a: Array, b: Array
) -> tuple[Array, tuple]:
    return _einsum_cpu(spec, preferred, a, b), (a, b)


def _einsum_cpu_bwd(
    spec: str, preferred: jnp.dtype | None, residuals: tuple, grad: Array
) -> tuple[Array, Array]:
    a, b = residuals
    inputs, out = spec.split("->")
    a_spec, b_spec = inputs.split(",")
    da = jnp.einsum(f"{out},{b_spec}->{a_spec}", grad, b.astype(grad.dtype))
    db = _contract_leading(a_spec, out, b_spec, a.astype(grad.dtype), grad)
    return da.astype(a.dtype), db.astype(b.dtype)


def _contract_leading(a_spec: str, g_spec: str, out: str, a: Array, g: Array) -> Array:
    """`einsum(a_spec,g_spec->out)` with the leading axes both operands contract (batch and
    length of a weight gradient) merged into one: XLA:CPU transposes a 2-d operand for its
    matmul several times faster than the 3-d slice of a scanned layer's saved activations."""
    shared = 0
    while (
        shared < min(len(a_spec), len(g_spec))
        and a_spec[shared] == g_spec[shared]
        and a_spec[shared] not in out
    ):
        shared += 1
    if shared > 1:
        a = a.reshape(-1, *a.shape[shared:])
        g = g.reshape(-1, *g.shape[shared:])
        a_spec, g_spec = a_spec[shared - 1 :], g_spec[shared - 1 :]
    return jnp.einsum(f"{a_spec},{g_spec}->{out}", a, g)


_einsum_cpu.defvjp(_einsum_cpu_fwd, _einsum_cpu_bwd)
