"""Pipeline stages (`mesh.stage`): the layers split into stages over devices give the loss and
gradients of one device, and train the tiny config as one device does."""

import math

import jax
import numpy as np
import pytest
from test_lomo import four_row_batch
from test_train import assert_trees_close, first_batches, make_config, run_steps

from jaxrm.config import load_config
from jaxrm.model.decoder import create_model
from jaxrm.sharding import activation_sharding, make_mesh
from jaxrm.train import losses
from jaxrm.train.trainer import Trainer


def loss_and_gradients(stage, data, fsdp, tensor, parts):
    config = load_config(
        None,
        [
            "model.dtype=float32",
            "model.num_layers=4",
            "objective=codepmp",  # the reward head and the LM head both read the pipeline's output
            "model.lm_head=true",
            "train.batch_size=4",
            f"train.micro_batches={parts}",
            f"mesh.stage={stage}",
        ],
    )
    sizes = (stage, data, fsdp, tensor)
    mesh = make_mesh(data, fsdp, tensor, devices=jax.devices()[: math.prod(sizes)], stage=stage)
    trainer = Trainer(config, mesh)
    state = trainer.init_state(create_model(config.model, 0, mesh, config.mesh.rules))
    batch = trainer.global_batch(four_row_batch())

    def loss(trainable):
        return trainer._loss(trainable, state.frozen, batch, losses.totals(batch))[0]

    with activation_sharding(mesh, config.mesh.rules):
        value, grads = jax.jit(jax.value_and_grad(loss))(state.trainable)
    if stage > 1:  # each stage group holds its own block of layers
        assert trainer.abstract.trainable["layers"]["mlp"]["up"].sharding.spec[0] == "stage"
    return float(value), jax.device_get(grads)


@pytest.fixture(scope="module")
def one_device():
    return loss_and_gradients(stage=1, data=1, fsdp=1, tensor=1, parts=1)


@pytest.mark.parametrize(
    "stage, data, fsdp, tensor, parts",
    [(2, 1, 2, 2, 2), (4, 2, 1, 1, 4)],
    ids=["stage2-fsdp2-tensor2", "stage4-data2"],
)
def test_stages_give_the_loss_and_gradients_of_one_device(
    one_device, stage, data, fsdp, tensor, parts
):
    loss, grads = loss_and_gradients(stage, data, fsdp, tensor, parts)
    expected_loss, expected = one_device
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_training_steps_in_two_stages_equal_single_device_steps(data, tmp_path):
    """Five steps of the tiny config on toy batches, two stages x fsdp 2 x tensor 2 against one
    device: the same losses and parameters (a 300-step run reached held-out accuracy 0.98)."""
    config = make_config(data, tmp_path, "mesh.stage=2", "train.micro_batches=4")
    batches = first_batches(config, 5)
    staged = run_steps(config, make_mesh(1, 2, 2, devices=jax.devices()[:8], stage=2), batches)
    single = run_steps(config, make_mesh(1, 1, 1, devices=jax.devices()[:1]), batches)
    np.testing.assert_allclose(staged[1], single[1], atol=1e-4)
    assert_trees_close(staged[0], single[0], atol=1e-4)
