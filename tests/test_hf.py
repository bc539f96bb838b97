"""Hugging Face interop, checked against transformers (PyTorch, CPU, fp32) on tiny random models."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from data_helpers import hf_model
from flax import nnx

from jaxrm.checkpoint.items import save_model
from jaxrm.checkpoint.loading import load_model
from jaxrm.config import load_config
from jaxrm.errors import UserError
from jaxrm.hf.convert import export_hf, load_hf
from jaxrm.model.decoder import (
    create_model,
    last_token_index,
    rewards_at,
    segments_from_attention_mask,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PAD = 256, 0
FP32 = ["model.dtype=float32"]


def padded_batch(side, seed=0):
    rng = np.random.default_rng(seed)
    lengths, width = [9, 4, 14], 16
    ids = np.full((3, width), PAD, np.int64)
    mask = np.zeros((3, width), np.int64)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = rng.integers(1, VOCAB, n)
        mask[row, cols] = 1
    return ids, mask


def hf_rewards(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()


def jaxrm_rewards(model, ids, mask):
    segment_ids, positions = segments_from_attention_mask(jnp.asarray(mask))
    hidden = model(jnp.asarray(ids, jnp.int32), segment_ids, positions)
    return np.asarray(
        rewards_at(model.token_rewards(hidden), last_token_index(segment_ids, 1))[:, 0]
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_imported_hf_reward_model_gives_transformers_rewards(tmp_path, arch, side):
    reference = hf_model(arch, "ForSequenceClassification", rope_theta=50000.0)
    reference.save_pretrained(tmp_path)
    loaded = load_hf(tmp_path, overrides=FP32)
    ids, mask = padded_batch(side)
    want = hf_rewards(reference, ids, mask)
    np.testing.assert_allclose(jaxrm_rewards(loaded.model, ids, mask), want, atol=1e-4, rtol=0)
    assert loaded.config.model.qkv_bias == (arch == "qwen2")
    assert loaded.config.model.rope_theta == 50000.0


def randomised(config_overrides, seed=0):
    """A jaxrm model (fp32) whose every parameter, biases and norms too, is random."""
    config = load_config(None, [*FP32, "model.vocab_size=256", *config_overrides])
    model = create_model(config.model, seed=seed)
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, noisy))
    return model, config


EXPORT_CASES = {
    "llama-gqa-untied": ("llama", ["model.rope_theta=500000.0"]),
    "llama-mha-tied-llama3-rope": (
        "llama",
        [
            "model.num_kv_heads=4",
            "model.tie_embeddings=true",
            "model.rope_scaling={type: llama3, factor: 8.0, low_freq_factor: 1.0, "
            "high_freq_factor: 4.0, original_max_position_embeddings: 16}",
        ],
    ),
    "qwen2-bias-tied": (
        "qwen2",
        ["model.qkv_bias=true", "model.tie_embeddings=true", "model.rope_theta=1000000.0"],
    ),
    "qwen2-no-bias-untied": ("qwen2", ["model.num_kv_heads=1"]),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_exported_model_loads_in_transformers_and_gives_jaxrm_rewards(tmp_path, case):
    arch, overrides = EXPORT_CASES[case]
    model, config = randomised(overrides)
    checkpoint = save_model(tmp_path / "ckpt", model, config)
    out = export_hf(load_model(checkpoint), tmp_path / "hf", arch=arch, max_shard_bytes=100_000)

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["num_labels"] == 1 and hf_config["id2label"] == {"0": "LABEL_0"}
    assert hf_config["pad_token_id"] is not None
    # Without it vLLM serves sigmoid(reward) to every request that does not opt out.
    assert hf_config["problem_type"] == "regression"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert (
        len(shards) > 1
        and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    )
    for shard in shards:
        with safetensors.safe_open(out / shard, "np") as f:
            assert f.metadata() == {"format": "pt"}

    reference, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert (
        type(reference).__name__
        == {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}[
            arch
        ]
    )
    for side in ("left", "right"):
        ids, mask = padded_batch(side, seed=1)
        want = hf_rewards(reference.float().eval(), ids, mask)
        np.testing.assert_allclose(jaxrm_rewards(model, ids, mask), want, atol=1e-4, rtol=0)


def test_internlm2_export_then_import_is_bit_identical_with_grouped_wqkv(tmp_path):
    model, config = randomised(
        ["model.num_heads=4", "model.num_kv_heads=2", "model.reward_token_id=7"]
    )
    out = export_hf(
        load_model(save_model(tmp_path / "ckpt", model, config)), tmp_path / "hf", arch="internlm2"
    )
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["InternLM2ForRewardModel"]
    assert hf_config["reward_token_id"] == 7
    # Every key of POLAR-7B's released config.json that InternLM2Config and its modeling code
    # read; pretraining_tp missing made InternLM's remote code fail to load an export.
    released = {
        "architectures", "auto_map", "attn_implementation", "bias", "bos_token_id",
        "eos_token_id", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
        "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
        "num_key_value_heads", "pad_token_id", "pretraining_tp", "reward_token_id",
        "rms_norm_eps", "rope_scaling", "rope_theta", "tie_word_embeddings", "torch_dtype",
        "use_cache", "vocab_size",
    }  # fmt: skip
    assert released <= hf_config.keys(), released - hf_config.keys()
    assert (hf_config["pretraining_tp"], hf_config["bos_token_id"], hf_config["eos_token_id"]) == (
        1,
        1,
        2,
    )

    # The fused layout, built here independently: per KV head g, rows of [q heads of g..., k_g, v_g].
    attention = model.layers.attention
    wq, wk, wv = (np.asarray(p[...][0]) for p in (attention.wq, attention.wk, attention.wv))
    heads_per_group, rows = 2, []
    for g in range(2):
        for h in range(g * heads_per_group, (g + 1) * heads_per_group):
            rows.append(wq[:, h, :].T)
        rows += [wk[:, g, :].T, wv[:, g, :].T]
    expected = np.concatenate(rows, axis=0)
    with safetensors.safe_open(next(out.glob("*.safetensors")), "np") as f:
        np.testing.assert_array_equal(
            f.get_tensor("model.layers.0.attention.wqkv.weight"), expected
        )
        assert f.get_tensor("v_head.weight").shape == (1, 64)

    back = load_hf(out, overrides=FP32)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.Param)),
        jax.tree.leaves(nnx.state(back.model, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.config.model.reward_token_id == 7


@pytest.mark.parametrize("arch, tie", [("llama", False), ("qwen2", True)])
def test_base_lm_import_makes_zero_or_normal_head_and_keeps_lm_head(tmp_path, arch, tie):
    reference = hf_model(arch, "ForCausalLM", tie_word_embeddings=tie)
    reference.save_pretrained(tmp_path)
    zero = load_hf(tmp_path, head="zero", overrides=FP32)
    assert not np.any(np.asarray(zero.model.score[...])) and not zero.config.model.lm_head
    normal = load_hf(tmp_path, head="normal", keep_lm_head=True, overrides=FP32)
    assert 0.01 < float(np.std(np.asarray(normal.model.score[...]))) < 0.04
    assert normal.config.model.lm_head and normal.config.model.tie_embeddings == tie

    ids, mask = padded_batch("right")
    segment_ids, positions = segments_from_attention_mask(jnp.asarray(mask))
    logits = normal.model.lm_logits(
        normal.model(jnp.asarray(ids, jnp.int32), segment_ids, positions)
    )
    with torch.no_grad():
        want = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits)[mask == 1], want[mask == 1], atol=1e-4, rtol=0)


def test_causal_lm_export_round_trips_through_transformers(tmp_path):
    model, config = randomised(["model.lm_head=true"])
    out = export_hf(
        load_model(save_model(tmp_path / "ckpt", model, config)), tmp_path / "lm", causal_lm=True
    )
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask = padded_batch("right")
    segment_ids, positions = segments_from_attention_mask(jnp.asarray(mask))
    logits = model.lm_logits(model(jnp.asarray(ids, jnp.int32), segment_ids, positions))
    with torch.no_grad():
        want = reference.float()(
            torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits)[mask == 1], want[mask == 1], atol=1e-4, rtol=0)


def test_bin_weights_load_safely_and_unsafe_pickles_are_refused(tmp_path):
    reference = hf_model("llama", "ForSequenceClassification")
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_hf(tmp_path, overrides=FP32)
    ids, mask = padded_batch("right")
    np.testing.assert_allclose(
        jaxrm_rewards(loaded.model, ids, mask), hf_rewards(reference, ids, mask), atol=1e-4
    )

    evil = tmp_path / "evil"
    evil.mkdir()
    reference.config.save_pretrained(evil)
    torch.save({"model.norm.weight": torch.zeros(64), "x": _Pickled()}, evil / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused or unreadable"):
        load_hf(evil)


class _Pickled:
    """An object that `weights_only` loading must refuse to rebuild."""


def test_cli_import_export_and_errors(tmp_path):
    hf_model("qwen2", "ForCausalLM").save_pretrained(tmp_path / "base")
    jaxrm = [sys.executable, "-m", "jaxrm"]
    run = lambda *a: subprocess.run([*jaxrm, *map(str, a)], capture_output=True, text=True)  # noqa: E731
    result = run(
        "import", tmp_path / "base", tmp_path / "ckpt", "--head", "normal", "--keep-lm-head"
    )
    assert result.returncode == 0, result.stderr
    result = run("export", tmp_path / "ckpt", tmp_path / "out", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    with safetensors.safe_open(next((tmp_path / "out").glob("*.safetensors")), "np") as f:
        names = list(f.keys())
    assert "lm_head.weight" not in names and "score.weight" in names

    start = lambda *a: subprocess.Popen(  # noqa: E731
        [*jaxrm, *map(str, a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    errors = [
        (("export", tmp_path / "ckpt", tmp_path / "out"), "already exists and is not empty"),
        (("import", tmp_path / "nowhere", tmp_path / "c2"), "nowhere"),
        (("export", tmp_path, tmp_path / "o2"), "not a jaxrm checkpoint"),
        (
            ("import", tmp_path / "base", tmp_path / "c3", "--preset", "tiny"),
            "does not have the shape of preset tiny",
        ),
        (
            ("export", tmp_path / "ckpt", tmp_path / "o3", "--arch", "llama"),
            "export with --arch qwen2",
        ),
    ]
    # All at once: each only reads what the two commands above wrote.
    started = [(args, message, start(*args)) for args, message in errors]
    for args, message, process in started:
        _, err = process.communicate(timeout=300)
        assert process.returncode != 0 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c3").exists() and not (tmp_path / "o2").exists()


def test_import_refuses_non_finite_weights_and_a_negative_rope_theta(tmp_path):
    import torch

    model = hf_model("llama", "ForCausalLM")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(UserError, match=r"'model.layers.1.mlp.up_proj.weight' holds NaN"):
        load_hf(tmp_path / "nan")

    model = hf_model("llama", "ForCausalLM")
    model.save_pretrained(tmp_path / "theta")
    config = json.loads((tmp_path / "theta" / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = -1.0
    (tmp_path / "theta" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope_theta must be a positive finite number"):
        load_hf(tmp_path / "theta")
