"""Bad config values, one table: each stops `jaxrm train` at config load with one line naming
the key, and writes nothing. Valid values at the edges of each range still load."""

import functools
from pathlib import Path

import pytest

from jaxrm import cli
from jaxrm.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = f"base: {REPO / 'configs' / 'tiny_polar.yaml'}\noutput_dir: run\n"

BAD_OVERRIDES = [
    # model
    ("model.vocab_size", ["model.vocab_size=0"]),
    ("model.hidden_size", ["model.hidden_size=-64"]),
    ("model.intermediate_size", ["model.intermediate_size=0"]),
    ("model.num_layers", ["model.num_layers=0"]),
    ("model.num_heads", ["model.num_heads=0"]),
    ("model.num_kv_heads", ["model.num_kv_heads=0"]),
    ("model.num_kv_heads", ["model.num_kv_heads=3"]),
    ("model.num_kv_heads", ["model.num_heads=6", "model.num_kv_heads=4"]),
    ("model.head_dim", ["model.head_dim=15"]),
    ("model.head_dim", ["model.head_dim=-16"]),
    ("model.max_position_embeddings", ["model.max_position_embeddings=0"]),
    ("model.rope_theta", ["model.rope_theta=.nan"]),
    ("model.rope_theta", ["model.rope_theta=0"]),
    ("model.rms_norm_eps", ["model.rms_norm_eps=-1e-5"]),
    ("model.rms_norm_eps", ["model.rms_norm_eps=.inf"]),
    ("model.rms_norm_eps", ["model.rms_norm_eps=1e-400"]),  # 0 once read
    ("model.dtype", ["model.dtype=fp8"]),
    ("model.param_dtype", ["model.param_dtype=int8"]),
    ("model.attention", ["model.attention=flash"]),
    ("model.attention", ["model.attention=cudnn"]),  # the config computes in float32
    ("model.remat", ["model.remat=some"]),
    ("model.layer_loop", ["model.layer_loop=while"]),
    ("model.reward_head_init", ["model.reward_head_init=ones"]),
    ("model.lora_rank", ["model.lora_rank=-1"]),
    ("model.lora_alpha", ["model.lora_alpha=.nan"]),
    ("model.lora_alpha", ["model.lora_alpha=0"]),
    ("model.lora_targets", ["model.lora_targets=[wq, attn]"]),
    ("model.rope_scaling", ["model.rope_scaling={type: yarn, factor: 2}"]),
    ("model.rope_scaling.factor", ["model.rope_scaling={type: linear, factor: -2}"]),
    ("model.rope_scaling.factor", ["model.rope_scaling={type: linear, factor: .nan}"]),
    ("model.rope_scaling.factor", ["model.rope_scaling={type: linear}"]),
    ("model.rope_scaling.low_freq_factor", ["model.rope_scaling={type: llama3, factor: 8}"]),
    (
        "model.rope_scaling.high_freq_factor",
        [
            "model.rope_scaling={type: llama3, factor: 8, low_freq_factor: 4, "
            "high_freq_factor: 1, original_max_position_embeddings: 8192}"
        ],
    ),
    ("model.reward_token_id", ["model.reward_token_id=-1"]),
    ("model.reward_token_id", ["model.reward_token_id=1024"]),  # the tiny vocabulary's size
    ("model.preset", ["model.preset=qwen3"]),
    ("model.qkv_bias", ["model.qkv_bias=maybe"]),
    ("model.attributes", ["model.attributes=[helpful, helpful]"]),
    ("model.attributes", ["model.attributes=[helpful, 3]"]),
    ("model.attributes", ["objective=prm", "model.attributes=[helpful, correct]"]),
    ("model.attribute_weights", ["model.attributes=[a, b]", "model.attribute_weights=[1]"]),
    ("model.attribute_weights", ["model.attributes=[a, b]", "model.attribute_weights=[1, .nan]"]),
    # optimizer
    ("optimizer.name", ["optimizer.name=sgd"]),
    ("optimizer.schedule", ["optimizer.schedule=linear"]),
    ("optimizer.lr", ["optimizer.lr=0"]),
    ("optimizer.lr", ["optimizer.lr=-1e-3"]),
    ("optimizer.lr", ["optimizer.lr=.nan"]),
    ("optimizer.lr", ["optimizer.lr=1e400"]),  # inf once read
    ("optimizer.lr", ["optimizer.lr=fast"]),
    ("optimizer.b1", ["optimizer.b1=1"]),
    ("optimizer.b1", ["optimizer.b1=-0.1"]),
    ("optimizer.b2", ["optimizer.b2=.nan"]),
    ("optimizer.warmup_ratio", ["optimizer.warmup_ratio=1.5"]),
    ("optimizer.warmup_ratio", ["optimizer.schedule=wsd", "optimizer.warmup_ratio=0.95"]),
    ("optimizer.min_lr_ratio", ["optimizer.min_lr_ratio=-0.1"]),
    ("optimizer.decay_ratio", ["optimizer.decay_ratio=.nan"]),
    ("optimizer.weight_decay", ["optimizer.weight_decay=-0.01"]),
    ("optimizer.weight_decay", ["optimizer.weight_decay=.inf"]),
    ("optimizer.grad_clip", ["optimizer.grad_clip=0"]),
    ("optimizer.grad_clip", ["optimizer.grad_clip=.nan"]),
    ("optimizer.name", ["optimizer.name=lomo", "model.lora_rank=4"]),
    ("mesh.stage", ["mesh.stage=0"]),
    ("mesh.stage", ["mesh.stage=3"]),  # the default tiny preset has 2 layers
    ("mesh.stage", ["mesh.stage=2", "mesh.context=2"]),
    ("mesh.stage", ["mesh.stage=2", "optimizer.name=adalomo"]),
    ("optimizer.b1", ["optimizer.name=adalomo", "optimizer.b1=0.9"]),
    ("optimizer.b2", ["optimizer.name=lomo", "optimizer.b2=0.9"]),
    # train
    ("train.steps", ["train.steps=0"]),
    ("train.steps", ["train.steps=-5"]),
    ("train.steps", ["train.steps=ten"]),
    ("train.batch_size", ["train.batch_size=0"]),
    ("train.batch_size", ["train.batch_size=8.5"]),
    ("train.micro_batches", ["train.micro_batches=0"]),
    ("train.micro_batches", ["train.micro_batches=3"]),
    ("train.log_every", ["train.log_every=0"]),
    ("train.eval_every", ["train.eval_every=-1"]),
    ("train.seed", ["train.seed=-1"]),
    ("train.seed", ["train.seed=4294967296"]),
    # data
    ("data.seq_len", ["data.seq_len=0"]),
    ("data.seq_len", ["data.seq_len=-512"]),
    ("data.seq_len", ["model.rope_scaling={type: dynamic, factor: 2}", "data.seq_len=8192"]),
    ("data.max_length", ["data.max_length=4"]),
    ("data.max_length", ["data.max_length=1024"]),
    ("data.max_response_length", ["data.max_response_length=0"]),
    ("data.pairs_per_row", ["data.pairs_per_row=0"]),
    ("data.max_candidates", ["data.max_candidates=1"]),
    ("data.num_workers", ["data.num_workers=-1"]),
    ("data.wrapper", ["data.wrapper=chat"]),
    ("data.shuffle", ["data.shuffle=sometimes"]),
    ("data.reward_marker", ["data.reward_marker=-3"]),
    ("data.reward_token", ["data.reward_token=-1"]),
    ("data.reward_token", ["data.reward_token=4096"]),
    # loss
    ("loss.center_rewards", ["loss.center_rewards=.nan"]),
    ("loss.center_rewards", ["loss.center_rewards=-1"]),
    ("loss.lm_weight", ["loss.lm_weight=-1"]),
    ("loss.lm_weight", ["loss.lm_weight=.inf"]),
    ("loss.margin", ["loss.margin=3"]),
    # checkpoint
    ("checkpoint.every", ["checkpoint.every=0"]),
    ("checkpoint.every", ["checkpoint.every=-100"]),
    ("checkpoint.keep", ["checkpoint.keep=0"]),
    ("checkpoint.keep", ["checkpoint.keep=-1"]),
    ("checkpoint.async_save", ["checkpoint.async_save=often"]),
    # mesh
    ("mesh.data", ["mesh.data=0"]),
    ("mesh.data", ["mesh.data=-1"]),  # mesh.fsdp is -1 already
    ("mesh.fsdp", ["mesh.fsdp=-2"]),
    ("mesh.tensor", ["mesh.tensor=0"]),
    ("mesh.tensor", ["mesh.tensor=two"]),
    ("mesh.rules.embed", ["mesh.rules.embed=model"]),
    ("mesh.rules.embd", ["mesh.rules.embd=fsdp"]),
    # top level
    ("objective", ["objective=dpo"]),
    ("output_dir", ["output_dir="]),
    ("output_dir", ["output_dir=''"]),
    ("train.step", ["train.step=5"]),
    ("train", ["train"]),
]

BAD_FILES = [
    ("config.yaml", b"\xff\xfe\x00"),
    ("'steps' appears twice", b"train:\n  steps: 3\n  steps: 4\n"),
    ("config.yaml", b"- 1\n- 2\n"),
    ("config.yaml", b"model: [\n"),
    ("trian.steps", CONFIG.encode() + b"trian:\n  steps: 3\n"),
    ("train.steps", CONFIG.encode() + b"train:\n  steps: [1, 2]\n"),
    ("optimizer.lr", CONFIG.encode() + b"optimizer:\n  lr: .nan\n"),
    ("'model'", CONFIG.encode() + b"model: 3\n"),
    ("missing.yaml", b"base: missing.yaml\n"),
]

VALID_EDGES = [
    ("optimizer.b1=0", "optimizer.b1", 0.0),
    ("optimizer.b2=0.999", "optimizer.b2", 0.999),
    ("optimizer.weight_decay=0", "optimizer.weight_decay", 0.0),
    ("optimizer.grad_clip=null", "optimizer.grad_clip", None),  # no clipping
    ("optimizer.warmup_ratio=0", "optimizer.warmup_ratio", 0.0),
    ("optimizer.warmup_ratio=1", "optimizer.warmup_ratio", 1.0),
    ("optimizer.min_lr_ratio=0", "optimizer.min_lr_ratio", 0.0),
    ("optimizer.min_lr_ratio=1", "optimizer.min_lr_ratio", 1.0),
    ("optimizer.lr=1e-5", "optimizer.lr", 1e-5),  # YAML reads this as a string
    ("train.eval_every=0", "train.eval_every", 0),  # at the end only
    ("train.steps=1", "train.steps", 1),
    ("train.log_every=1", "train.log_every", 1),
    ("train.micro_batches=8", "train.micro_batches", 8),
    ("train.seed=0", "train.seed", 0),
    ("train.seed=4294967295", "train.seed", 2**32 - 1),
    ("data.num_workers=0", "data.num_workers", 0),  # in the main process
    ("data.max_length=8", "data.max_length", 8),
    ("data.max_length=512", "data.max_length", 512),
    ("data.seq_len=16", "data.max_length", 8),
    ("data.pairs_per_row=1", "data.pairs_per_row", 1),
    ("data.max_candidates=2", "data.max_candidates", 2),
    ("data.reward_token=0", "data.reward_token", 0),
    ("model.lora_rank=0", "model.lora_rank", 0),
    ("model.num_kv_heads=4", "model.num_kv_heads", 4),
    ("model.num_kv_heads=1", "model.num_kv_heads", 1),
    ("model.reward_token_id=0", "model.reward_token_id", 0),
    ("model.reward_token_id=1023", "model.reward_token_id", 1023),
    ("model.rope_scaling=null", "model.rope_scaling", None),
    ("loss.center_rewards=0", "loss.center_rewards", 0.0),
    ("loss.lm_weight=0", "loss.lm_weight", 0.0),
    ("checkpoint.every=1", "checkpoint.every", 1),
    ("checkpoint.keep=1", "checkpoint.keep", 1),
    ("mesh={data: -1, fsdp: 1}", "mesh.data", -1),
]


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """`jaxrm train` on config.yaml in tmp_path (the working directory), with training itself
    replaced, since a bad value must stop the command before it: returns (exit code, stdout,
    stderr, the configs training was called with)."""
    monkeypatch.chdir(tmp_path)
    trained = []
    monkeypatch.setattr("jaxrm.train.loop.train", lambda c: trained.append(c) or {"step": 1})

    def go(text, overrides):
        (tmp_path / "config.yaml").write_bytes(text)
        code = cli.main(["train", str(tmp_path / "config.yaml"), *overrides])
        return (code, *capsys.readouterr(), trained)

    return go


def assert_refused(result, tmp_path, named):
    code, out, err, trained = result
    assert code != 0 and not trained
    assert err.startswith("jaxrm: error: ") and err.count("\n") == 1, err
    assert named in err, err
    assert "Traceback" not in out + err
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # nothing written


def test_the_base_config_reaches_training(run):
    code, out, err, trained = run(CONFIG.encode(), [])
    assert out.startswith("trained to step 1")
    assert (code, err, len(trained)) == (0, "", 1)
    assert trained[0].output_dir == str(Path.cwd() / "run")


@pytest.mark.parametrize("key, overrides", BAD_OVERRIDES, ids=str)
def test_a_bad_override_is_one_line_naming_the_key(run, tmp_path, key, overrides):
    assert_refused(run(CONFIG.encode(), overrides), tmp_path, key)


@pytest.mark.parametrize("named, text", BAD_FILES, ids=lambda v: str(v)[:40])
def test_a_bad_config_file_is_one_line_naming_the_file_or_key(run, tmp_path, named, text):
    assert_refused(run(text, []), tmp_path, named)


@pytest.mark.parametrize("override, key, value", VALID_EDGES)
def test_values_at_the_edges_of_their_range_load(tmp_path, override, key, value):
    (tmp_path / "config.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "config.yaml", [override])
    assert functools.reduce(getattr, key.split("."), config) == value
