"""Context parallelism (`mesh.context`): each packed row's tokens split over devices give what
the unsplit row gives — attention against the dense definition, then the whole objective's loss
and gradients and five training steps against one device, for POLAR triples with shared prefixes
and for CodePMP with its LM loss."""

import jax
import numpy as np
import pytest
import test_attention
from flax import nnx
from test_attention import assert_same_as_reference, splash_interpret
from test_train import assert_trees_close, first_batches, make_config, run_steps

import jaxrm.model.attention
from jaxrm.config import load_config
from jaxrm.errors import UserError
from jaxrm.model.attention import attention, xla_attention
from jaxrm.model.decoder import create_model
from jaxrm.sharding import DEFAULT_RULES, activation_sharding, make_mesh
from jaxrm.train import losses
from jaxrm.train.trainer import Trainer

MESHES = {"context4": {"fsdp": 2, "context": 4}, "context2_fsdp4": {"fsdp": 4, "context": 2}}


def xla(q, k, v, segments, prefixes, span=None):
    return attention(q, k, v, segments, prefixes, "xla", span)


def test_split_rows_attend_as_the_reference():
    # tensor=2 splits the 2 kv heads as the 4 query heads; the whole-objective tests below run
    # context=4 and context=2 x fsdp=4.
    with activation_sharding(make_mesh(fsdp=2, context=2, tensor=2), DEFAULT_RULES):
        assert jaxrm.model.attention.context_axes((3, test_attention.LENGTH, 4, 16)) == ("context",)
        assert_same_as_reference(xla, shared_prefix=True)


def test_splash_with_split_rows_attends_as_the_reference(monkeypatch):
    # The kernel's mask is split into 4 query shards of 128 tokens each.
    monkeypatch.setattr(test_attention, "LENGTH", 512)
    with activation_sharding(make_mesh(fsdp=2, context=4), DEFAULT_RULES):
        assert_same_as_reference(splash_interpret, shared_prefix=True)


def test_split_rows_skip_keys_beyond_the_span():
    """Each context shard's query blocks read a window of `span` keys, placed by the shard's
    offset in the row; sequences no longer than the span see all they should."""
    rng = np.random.default_rng(3)
    length, span = 512, 40
    segments = np.zeros((2, length), np.int32)
    start = segment = 0
    while start < length:
        size = int(rng.integers(1, span + 1))
        segment += 1
        segments[:, start : start + size] = segment
        start += size
    segments[1, 400:] = 0  # padding
    q, k, v = (np.asarray(rng.normal(size=(2, length, h, 8)), np.float32) for h in (4, 2, 2))
    want = xla_attention(q, k, v, segments)
    with activation_sharding(make_mesh(fsdp=2, context=4), DEFAULT_RULES):
        got = jax.jit(lambda *a: xla(*a, span=span))(q, k, v, segments, None)
    real = (segments != 0)[..., None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-6)


def objective_config(data, tmp_path, objective, *overrides):
    extra = ["model.lm_head=true"] if objective == "codepmp" else ["data.shared_prefix=true"]
    return make_config(data, tmp_path, f"objective={objective}", *extra, *overrides)


def loss_and_grads(config, mesh, batch):
    trainer = Trainer(config, mesh)
    batch = trainer.global_batch(batch)
    model = create_model(config.model, config.train.seed, mesh, config.mesh.rules)

    def loss(model):
        return losses.objective(model, batch, config, losses.totals(batch))[0]

    with activation_sharding(mesh, config.mesh.rules):
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    return float(value), jax.device_get(nnx.state(grads))


@pytest.fixture(scope="module", params=["polar", "codepmp"])
def one_device(request, data, tmp_path_factory):
    """(objective, its first five batches, loss and gradients on batch 0, five steps' losses)
    on one device."""
    config = objective_config(data, tmp_path_factory.mktemp("one"), request.param)
    batches = first_batches(config, 5)
    if request.param == "polar":
        assert batches[0]["prefix_ids"].any()  # the shared prefixes are packed once
    else:
        assert batches[0]["lm_weights"].any()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return (
        request.param,
        batches,
        loss_and_grads(config, mesh, batches[0]),
        run_steps(config, mesh, batches),
    )


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_split_rows_give_one_device_loss_gradients_and_steps(
    one_device, data, tmp_path, monkeypatch, mesh_name
):
    objective, batches, (want_loss, want_grads), (want_params, want_losses) = one_device
    sizes = MESHES[mesh_name]
    config = objective_config(
        data, tmp_path, objective, *(f"mesh.{axis}={n}" for axis, n in sizes.items())
    )
    mesh = config.mesh.make()
    split_calls = []
    context_attention = jaxrm.model.attention.context_attention
    monkeypatch.setattr(
        jaxrm.model.attention,
        "context_attention",
        lambda *a, **k: split_calls.append(a[0].shape) or context_attention(*a, **k),
    )
    loss, grads = loss_and_grads(config, mesh, batches[0])
    assert split_calls  # attention ran on split rows
    np.testing.assert_allclose(loss, want_loss, atol=1e-5, rtol=0)
    assert_trees_close(grads, want_grads, atol=1e-5)
    params, step_losses = run_steps(config, mesh, batches)
    np.testing.assert_allclose(step_losses, want_losses, atol=1e-5)
    assert_trees_close(params, want_params, atol=1e-4)


def test_context_must_divide_rows_and_suit_the_kernel():
    with pytest.raises(UserError, match=r"data.seq_len \(100\) must be a multiple of mesh.context"):
        load_config(None, ["data.seq_len=100", "mesh.context=8"])
    with pytest.raises(UserError, match=r"mesh.context \(2\) x 128 with model.attention: splash"):
        load_config(None, ["data.seq_len=384", "mesh.context=2", "model.attention=splash"])
    with pytest.raises(UserError, match=r"model\.attention: cudnn does not support"):
        load_config(None, ["mesh.context=2", "model.attention=cudnn"])
    with pytest.raises(UserError, match=r"mesh\.context must be a positive size"):
        load_config(None, ["mesh.context=-1"])
