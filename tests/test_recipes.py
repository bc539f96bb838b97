"""The paper-recipe configs carry the published hyper-parameters (METHODS.md) and shard evenly."""

from pathlib import Path

import pytest

from jaxrm.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

POLAR = dict(
    objective="polar",
    b1=0.9,
    b2=0.95,
    weight_decay=0.0,
    grad_clip=1.0,
    schedule="warmup_cosine",
    warmup_ratio=0.03,
    min_lr_ratio=0.1,
    max_length=16384,
    max_response_length=4096,
    reward_marker="<|reward|>",
    reward_token_id=92527,
)
CODEPMP = dict(
    objective="codepmp",
    weight_decay=0.1,
    schedule="wsd",
    warmup_ratio=0.03,
    decay_ratio=0.1,
    lr=1e-6,
    max_length=1024,  # the published "sequence length 1024", per sequence
    lm_head=True,
    reward_head_init="normal",
    lm_weight=1.0,
)

RECIPES = {
    "polar_pretrain_1_8b": dict(
        POLAR, preset="internlm2.5-1.8b", lr=1.4e-5, wrapper="pretrain", reward_head_init="zero"
    ),
    "polar_pretrain_7b": dict(
        POLAR, preset="internlm2.5-7b", lr=1.67e-5, wrapper="pretrain", reward_head_init="zero"
    ),
    "polar_sft_7b": dict(POLAR, preset="internlm2.5-7b", lr=2e-5, wrapper="sft"),
    "codepmp_qwen2_1_5b": dict(CODEPMP, preset="qwen2-1.5b"),
    "codepmp_qwen2_7b": dict(CODEPMP, preset="qwen2-7b"),
}

# Published batch sizes in triples; rows hold at most `data.pairs_per_row` of them.
PUBLISHED_TRIPLES_PER_STEP = {
    "polar_pretrain_1_8b": 1940,
    "polar_pretrain_7b": 4343,
    "polar_sft_7b": 320,
}

WHERE = {
    "objective": lambda c: c.objective,
    "preset": lambda c: c.model.preset,
    "lm_head": lambda c: c.model.lm_head,
    "reward_head_init": lambda c: c.model.reward_head_init,
    "reward_token_id": lambda c: c.model.reward_token_id,
    "lr": lambda c: c.optimizer.lr,
    "b1": lambda c: c.optimizer.b1,
    "b2": lambda c: c.optimizer.b2,
    "weight_decay": lambda c: c.optimizer.weight_decay,
    "grad_clip": lambda c: c.optimizer.grad_clip,
    "schedule": lambda c: c.optimizer.schedule,
    "warmup_ratio": lambda c: c.optimizer.warmup_ratio,
    "min_lr_ratio": lambda c: c.optimizer.min_lr_ratio,
    "decay_ratio": lambda c: c.optimizer.decay_ratio,
    "max_length": lambda c: c.data.max_length,
    "max_response_length": lambda c: c.data.max_response_length,
    "wrapper": lambda c: c.data.wrapper,
    "reward_marker": lambda c: c.data.reward_marker,
    "lm_weight": lambda c: c.loss.lm_weight,
}


def load(name):
    return load_config(CONFIGS / f"{name}.yaml")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_carries_the_published_hyper_parameters(name):
    config = load(name)
    got = {key: WHERE[key](config) for key in RECIPES[name]}
    assert got == RECIPES[name]
    assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")
    assert config.optimizer.name == "adamw"
    assert config.model.remat != "none"
    assert config.checkpoint.keep == 3


@pytest.mark.parametrize("name", RECIPES)
def test_rows_hold_a_whole_example_and_batches_split_evenly_over_the_mesh(name):
    config = load(name)
    assert config.data.seq_len == 2 * config.data.max_length
    mesh, train = config.mesh, config.train
    if -1 in (mesh.data, mesh.fsdp, mesh.tensor):
        return  # sizes known only on the slice
    batch_shards = mesh.data * mesh.fsdp
    assert train.batch_size % batch_shards == 0
    assert (train.batch_size // train.micro_batches) % batch_shards == 0
    hosts = mesh.data * mesh.fsdp * mesh.tensor // 4  # a TPU pod VM drives 4 chips
    assert train.batch_size % hosts == 0


@pytest.mark.parametrize("name", PUBLISHED_TRIPLES_PER_STEP)
def test_polar_steps_hold_about_the_published_number_of_triples(name):
    config = load(name)
    triples = config.train.batch_size * config.data.pairs_per_row
    assert triples == pytest.approx(PUBLISHED_TRIPLES_PER_STEP[name], rel=0.015)
