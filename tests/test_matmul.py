"""jaxrm.model.matmul's products equal jnp.einsum, values and gradients (its own backward runs on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.model.matmul import dense, einsum


@pytest.mark.parametrize(
    ("spec", "a_shape", "b_shape"),
    [
        ("bte,ehd->bthd", (2, 5, 8), (8, 3, 4)),
        ("bthd,hde->bte", (2, 5, 3, 4), (3, 4, 8)),
        ("bkgtd,bksd->bkgts", (2, 2, 3, 5, 4), (2, 2, 6, 4)),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_values_and_gradients_equal_jnp(spec, a_shape, b_shape, dtype):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal(a_shape), dtype)
    b = jnp.asarray(rng.standard_normal(b_shape), dtype)
    weights = jnp.asarray(rng.standard_normal(jnp.einsum(spec, a, b).shape), dtype)

    def loss(product):
        return lambda a, b: jnp.sum(jnp.tanh(product(spec, a, b)) * weights).astype(jnp.float32)

    ours = jax.jit(jax.value_and_grad(loss(einsum), argnums=(0, 1)))(a, b)
    reference = jax.value_and_grad(loss(jnp.einsum), argnums=(0, 1))(a, b)
    tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tolerance, atol=tolerance
        )


def test_dense_contracts_the_kernels_leading_axes():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
    np.testing.assert_allclose(dense(x, kernel, contract=2), jnp.tensordot(x, kernel, 2), rtol=1e-6)
    grads = jax.grad(lambda k: dense(x, k, contract=2).sum())(kernel)
    np.testing.assert_allclose(
        grads, jax.grad(lambda k: jnp.tensordot(x, k, 2).sum())(kernel), rtol=1e-5
    )
