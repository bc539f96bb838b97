import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm.config import load_config
from jaxrm.errors import UserError
from jaxrm.model.decoder import create_model
from jaxrm.sharding import activation_sharding, batch_sharding, logical_to_spec, make_mesh
from jaxrm.train import losses

P = jax.sharding.PartitionSpec


def pair_batch(rows=8, length=32, seed=0):
    """Each row packs two pairs: chosen/rejected sequences as segments 1..4."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 1024, (rows, length)).astype(np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    ends = np.zeros((rows, 4), np.int32)
    for r in range(rows):
        start = 0
        for seg, n in enumerate(rng.integers(3, 8, 4), 1):
            segment_ids[r, start : start + n] = seg
            positions[r, start : start + n] = np.arange(n)
            start += n
            ends[r, seg - 1] = start - 1
    return {
        "tokens": tokens,
        "segment_ids": segment_ids,
        "positions": positions,
        "reward_index": np.stack([ends[:, [0, 2]], ends[:, [1, 3]]], axis=-1),
        "margin": np.zeros((rows, 2), np.float32),
    }


def loss_and_grads(model, batch):
    config = load_config(None, ["model.dtype=float32"])
    loss = lambda m: losses.objective(m, batch, config, losses.totals(batch))[0]  # noqa: E731
    return nnx.value_and_grad(loss)(model)


def single_device(config, batch):
    model = create_model(config.model, seed=1)
    loss, grads = nnx.jit(loss_and_grads)(model, {k: jnp.asarray(v) for k, v in batch.items()})
    return loss, nnx.state(grads)


@pytest.fixture(scope="module")
def reference():
    config = load_config(None, ["model.dtype=float32"])
    batch = pair_batch()
    return config, batch, single_device(config, batch)


@pytest.mark.parametrize(
    "mesh_args",
    [
        ["mesh.fsdp=8"],
        ["mesh.fsdp=4", "mesh.tensor=2"],
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ],
)
def test_sharded_loss_and_grads_equal_single_device(reference, mesh_args):
    assert len(jax.devices()) == 8
    config, batch, (want_loss, want_grads) = reference
    config = load_config(None, ["model.dtype=float32", *mesh_args])
    m = config.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor)
    model = create_model(config.model, seed=1, mesh=mesh, rules=m.rules)
    gate = model.layers.mlp.gate[...]
    assert gate.sharding.spec == logical_to_spec(
        ("layers", "embed", "mlp"), gate.shape, m.rules, mesh
    )
    assert gate.sharding.spec[1] == "fsdp" and len(gate.addressable_shards) == 8

    sharded = {
        k: jax.device_put(v, batch_sharding(mesh, m.rules, v.shape)) for k, v in batch.items()
    }
    with activation_sharding(mesh, m.rules):
        loss, grads = nnx.jit(loss_and_grads)(model, sharded)
    np.testing.assert_allclose(loss, want_loss, atol=1e-5, rtol=0)
    flat_want = jax.tree.leaves(want_grads)
    flat_got = jax.tree.leaves(nnx.state(grads))
    assert len(flat_got) == len(flat_want)
    for got, want in zip(flat_got, flat_want, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_rules_drop_axes_that_do_not_divide_and_never_reuse_an_axis():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rules = {"kv_heads": "tensor", "embed": "fsdp", "batch": ["data", "fsdp"], "x": "tensor"}
    assert logical_to_spec(("embed", "kv_heads"), (64, 3), rules, mesh) == P("fsdp", None)
    assert logical_to_spec(("batch", "embed"), (8, 64), rules, mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "embed"), (2, 64), rules, mesh) == P("data", "fsdp")
    assert logical_to_spec(("kv_heads", "x"), (4, 4), rules, mesh) == P("tensor", None)


def test_mesh_fills_minus_one_and_rejects_impossible_shapes():
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape) == {
        "stage": 1,
        "data": 2,
        "fsdp": 2,
        "context": 1,
        "tensor": 2,
    }
    assert dict(make_mesh(fsdp=-1, context=4).shape)["fsdp"] == 2
    assert dict(make_mesh(fsdp=-1, stage=4).shape)["fsdp"] == 2
    with pytest.raises(UserError, match="cannot be split"):
        make_mesh(data=3, fsdp=-1, tensor=1)
    with pytest.raises(UserError, match="16 devices, but 8"):
        make_mesh(data=2, fsdp=4, tensor=2)
