"""Hugging Face interop: Llama, Qwen2 and InternLM2 weights in both directions.

One table of links says which HF tensors make which jaxrm parameters and how (transpose, split
heads, the fused InternLM2 `wqkv`); import and export both walk it, so the two directions cannot
drift apart. Flax kernels are [in, out] and torch Linear weights [out, in]; both sides use the
"rotate half" RoPE layout, so no permutation of q/k rows is needed.

Import streams: each stacked parameter is allocated in its target sharding and filled layer by
layer, so beside the finished parameters the host holds one layer's tensors at a time.
"""

import dataclasses
import functools
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxrm.checkpoint import TOKENIZER_FILES, Loaded, copy_tokenizer, require_new_dir
from jaxrm.config import ModelConfig, apply_overrides, config_from_dict, config_to_dict
from jaxrm.errors import UserError
from jaxrm.model import abstract_model, merge_lora
from jaxrm.presets import PRESETS, preset_shape
from jaxrm.sharding import Rules, make_mesh
from jaxrm.weights_io import ShardedWriter, WeightReader

Arch = Literal["llama", "qwen2", "internlm2"]
ARCHS: tuple[Arch, ...] = ("llama", "qwen2", "internlm2")
HeadInit = Literal["zero", "normal"]

# Tensors that carry no parameters of ours and may be left behind.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Link:
    """HF tensors `hf` (names, `{i}` = layer) <-> jaxrm parameters `params` (pure-dict paths)."""

    hf: tuple[str, ...]
    params: tuple[tuple[str, ...], ...]
    to_jax: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]


def _one(hf: str, param: tuple[str, ...], to_jax: Callable, to_hf: Callable) -> Link:
    return Link((hf,), (param,), lambda t: [to_jax(t[0])], lambda p: [to_hf(p[0])])


def _same(hf: str, param: tuple[str, ...]) -> Link:
    return _one(hf, param, lambda w: w, lambda w: w)


def _linear(hf: str, param: tuple[str, ...], *out_shape: int) -> Link:
    """torch [out, in] <-> flax [in, *out_shape]."""
    return _one(
        hf,
        param,
        lambda w: w.T.reshape(w.shape[1], *out_shape),
        lambda k: k.reshape(k.shape[0], -1).T,
    )


def _heads_out(hf: str, param: tuple[str, ...], heads: int, head_dim: int) -> Link:
    """torch o_proj [embed, heads*head_dim] <-> flax [heads, head_dim, embed]."""
    return _one(
        hf,
        param,
        lambda w: w.T.reshape(heads, head_dim, w.shape[0]),
        lambda k: k.reshape(heads * head_dim, -1).T,
    )


def _bias(hf: str, param: tuple[str, ...], heads: int, head_dim: int) -> Link:
    return _one(hf, param, lambda b: b.reshape(heads, head_dim), lambda b: b.reshape(-1))


def _fused_wqkv(hf: str, config: ModelConfig) -> Link:
    """InternLM2's wqkv: rows grouped per KV head as [q heads of the group..., k, v]."""
    n, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    groups = n // k

    def to_jax(tensors: list[np.ndarray]) -> list[np.ndarray]:
        w = tensors[0].reshape(k, groups + 2, d, -1)
        q = w[:, :groups].reshape(n, d, -1)
        return [
            q.transpose(2, 0, 1),
            w[:, groups].transpose(2, 0, 1),
            w[:, groups + 1].transpose(2, 0, 1),
        ]

    def to_hf(params: list[np.ndarray]) -> list[np.ndarray]:
        q, kk, v = (p.transpose(1, 2, 0) for p in params)  # [heads, head_dim, embed]
        q = q.reshape(k, groups, d, -1)
        fused = np.concatenate([q, kk[:, None], v[:, None]], axis=1)
        return [fused.reshape((n + 2 * k) * d, -1)]

    attention = ("layers", "attention")
    return Link((hf,), ((*attention, "wq"), (*attention, "wk"), (*attention, "wv")), to_jax, to_hf)


def links(config: ModelConfig, arch: Arch, score: bool, lm_head: bool) -> list[Link]:
    """The weight table for `arch`; `score` / `lm_head`: include those heads."""
    n, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    attn, mlp = ("layers", "attention"), ("layers", "mlp")
    layer = "model.layers.{i}."
    if arch == "internlm2":
        table = [
            _same("model.tok_embeddings.weight", ("embed",)),
            _fused_wqkv(layer + "attention.wqkv.weight", config),
            _heads_out(layer + "attention.wo.weight", (*attn, "wo"), n, d),
            _linear(layer + "feed_forward.w1.weight", (*mlp, "gate"), config.intermediate_size),
            _linear(layer + "feed_forward.w3.weight", (*mlp, "up"), config.intermediate_size),
            _linear(layer + "feed_forward.w2.weight", (*mlp, "down"), config.hidden_size),
            _same(layer + "attention_norm.weight", ("layers", "attention_norm", "scale")),
            _same(layer + "ffn_norm.weight", ("layers", "mlp_norm", "scale")),
            _same("model.norm.weight", ("final_norm", "scale")),
        ]
        score_name, lm_name = "v_head.weight", "output.weight"
    else:
        table = [
            _same("model.embed_tokens.weight", ("embed",)),
            _linear(layer + "self_attn.q_proj.weight", (*attn, "wq"), n, d),
            _linear(layer + "self_attn.k_proj.weight", (*attn, "wk"), k, d),
            _linear(layer + "self_attn.v_proj.weight", (*attn, "wv"), k, d),
            _heads_out(layer + "self_attn.o_proj.weight", (*attn, "wo"), n, d),
            _linear(layer + "mlp.gate_proj.weight", (*mlp, "gate"), config.intermediate_size),
            _linear(layer + "mlp.up_proj.weight", (*mlp, "up"), config.intermediate_size),
            _linear(layer + "mlp.down_proj.weight", (*mlp, "down"), config.hidden_size),
            _same(layer + "input_layernorm.weight", ("layers", "attention_norm", "scale")),
            _same(layer + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale")),
            _same("model.norm.weight", ("final_norm", "scale")),
        ]
        if config.qkv_bias:
            table += [
                _bias(layer + "self_attn.q_proj.bias", (*attn, "bq"), n, d),
                _bias(layer + "self_attn.k_proj.bias", (*attn, "bk"), k, d),
                _bias(layer + "self_attn.v_proj.bias", (*attn, "bv"), k, d),
            ]
        score_name, lm_name = "score.weight", "lm_head.weight"
    if score:
        table.append(_linear(score_name, ("score",), 1))
    if lm_head and not config.tie_embeddings:
        table.append(_linear(lm_name, ("lm_head",), config.vocab_size))
    return table


# --- configs ----------------------------------------------------------------------------------


def read_hf_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{directory}: no config.json, so not a Hugging Face model directory"
        ) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def detect_arch(hf_config: dict, where: str) -> Arch:
    model_type = hf_config.get("model_type", "")
    if model_type in ARCHS:
        return model_type
    architectures = " ".join(hf_config.get("architectures") or [])
    for arch, marker in (("internlm2", "InternLM2"), ("qwen2", "Qwen2"), ("llama", "Llama")):
        if marker in architectures:
            return arch
    raise UserError(
        f"{where}: model_type {model_type!r} ({architectures or 'no architectures'}) is not "
        "supported; jaxrm reads llama, qwen2 and internlm2 models"
    )


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and scaling from a transformers v4 (`rope_theta`, `rope_scaling`) or v5
    (`rope_parameters`) config."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("type", scaling.get("rope_type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    return theta, {
        "type": kind,
        **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")},
    }


def model_config_from_hf(hf: dict, arch: Arch, where: str) -> dict[str, Any]:
    """ModelConfig keys for an HF config (unsupported features are a UserError naming them)."""
    unsupported = {
        "llama": [("attention_bias", True), ("mlp_bias", True)],
        "qwen2": [("use_sliding_window", True)],
        "internlm2": [("bias", True)],
    }[arch]
    for key, bad in unsupported:
        if hf.get(key) == bad:
            raise UserError(f"{where}: {key}={bad} is not supported by jaxrm's {arch} layout")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act={hf['hidden_act']!r}; jaxrm's MLP is SwiGLU (silu)")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    return dict(
        preset=None,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        qkv_bias=arch == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        reward_token_id=hf.get("reward_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def hf_config(config: ModelConfig, arch: Arch, dtype: str, causal_lm: bool) -> dict[str, Any]:
    """config.json for `arch`, as a reward model or (`causal_lm`) a causal LM."""
    if arch in ("llama", "internlm2") and config.qkv_bias:
        raise UserError(
            f"this model has q/k/v biases, which the {arch} layout cannot hold; export with --arch qwen2"
        )
    if arch == "internlm2" and config.head_dim * config.num_heads != config.hidden_size:
        raise UserError("internlm2 requires head_dim * num_heads == hidden_size")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = None
    if config.rope_scaling:
        extra = {k: v for k, v in config.rope_scaling.items() if k not in ("type", "rope_type")}
        kind = config.rope_scaling.get("type", config.rope_scaling.get("rope_type"))
        rope = {"rope_type": kind, "rope_theta": config.rope_theta, **extra}
        scaling = {"type": kind, "rope_type": kind, **extra}
    pad = config.pad_token_id
    if pad is None:  # HF reads the reward at the rightmost non-pad token: pad must differ from it
        pad = 0 if config.reward_token_id != 0 else 1
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=config.tie_embeddings,
        pad_token_id=pad,
        torch_dtype=dtype,
        dtype=dtype,
    )
    if config.reward_token_id is not None:
        common["reward_token_id"] = config.reward_token_id
    if not causal_lm:
        common.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if arch == "internlm2":
        # The modeling code is POLAR's own (remote code); jaxrm ships none of it.
        kind = "InternLM2ForCausalLM" if causal_lm else "InternLM2ForRewardModel"
        auto = "AutoModelForCausalLM" if causal_lm else "AutoModel"
        return dict(
            architectures=[kind],
            model_type="internlm2",
            auto_map={
                "AutoConfig": "internlm/POLAR-7B--configuration_internlm2.InternLM2Config",
                auto: f"internlm/POLAR-7B--modeling_internlm2.{kind}",
            },
            bias=False,
            attn_implementation="eager",
            **common,
        )
    family = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    kind = f"{family}ForCausalLM" if causal_lm else f"{family}ForSequenceClassification"
    extra: dict[str, Any] = {"head_dim": config.head_dim, "rope_parameters": rope}
    if arch == "llama":
        extra.update(attention_bias=False, mlp_bias=False)
    else:
        extra.update(use_sliding_window=False, sliding_window=None)
    return dict(architectures=[kind], model_type=arch, **common, **extra)


# --- import -----------------------------------------------------------------------------------


def read_params(
    reader: WeightReader,
    table: Sequence[Link],
    abstract: dict,
    num_layers: int,
    where: str,
) -> dict:
    """Pure dict of parameters, each placed in the sharding of its `abstract` ShapeDtypeStruct.

    A stacked parameter is allocated on the devices first and filled one layer at a time, so the
    host holds one layer's tensors, never a whole stack.
    """
    params: dict = {}
    count = sum(len(link.hf) * (num_layers if link.per_layer else 1) for link in table)
    progress = tqdm(total=count, desc="import", unit="tensor", disable=None)
    for link in table:
        targets = [_get(abstract, path) for path in link.params]
        if link.per_layer:
            stacks = [_zeros(target) for target in targets]
            for i in range(num_layers):
                tensors = [reader.read(name.format(i=i)) for name in link.hf]
                values = link.to_jax(tensors)
                for j, (value, target, path) in enumerate(
                    zip(values, targets, link.params, strict=True)
                ):
                    _check_shape(value.shape, target.shape[1:], link, path, where, i)
                    stacks[j] = _set_layer(stacks[j], i, np.asarray(value, target.dtype))
                progress.update(len(link.hf))
                del tensors, values
        else:
            values = link.to_jax([reader.read(name) for name in link.hf])
            stacks = []
            for value, target, path in zip(values, targets, link.params, strict=True):
                _check_shape(value.shape, target.shape, link, path, where, None)
                stacks.append(_place(np.asarray(value, target.dtype), target))
            progress.update(len(link.hf))
            del values
        for path, stack in zip(link.params, stacks, strict=True):
            _set(params, path, stack)
    progress.close()
    return params


def _zeros(target: jax.ShapeDtypeStruct) -> jax.Array:
    sharding = getattr(target, "sharding", None)
    return jax.jit(lambda: jax.numpy.zeros(target.shape, target.dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, i: int, value: jax.Array) -> jax.Array:
    return stack.at[i].set(value)


def _place(host: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _check_shape(
    got: tuple, want: tuple, link: Link, path: tuple, where: str, layer: int | None
) -> None:
    if tuple(got) != tuple(want):
        name = link.hf[0].format(i=layer)
        raise UserError(
            f"{where}: tensor '{name}' gives {'.'.join(path)} shape {tuple(got)}, "
            f"but config.json implies {tuple(want)}"
        )


def unused_tensors(reader: WeightReader, table: Sequence[Link], num_layers: int) -> list[str]:
    used = {name.format(i=i) for link in table for name in link.hf for i in range(num_layers)}
    return [n for n in reader.names() if n not in used and not n.endswith(_IGNORED_SUFFIXES)]


def head_names(arch: Arch) -> tuple[str, str]:
    """(reward head, LM head) tensor names of `arch`."""
    return (
        ("v_head.weight", "output.weight")
        if arch == "internlm2"
        else ("score.weight", "lm_head.weight")
    )


# --- export -----------------------------------------------------------------------------------


def write_params(
    params: dict, table: Sequence[Link], writer: ShardedWriter | None, num_layers: int, dtype: Any
) -> None:
    """Converts and writes every linked tensor; every process gathers, only one with a writer writes."""
    for link in tqdm(table, desc="export", unit="parameter", disable=None):
        arrays = [to_host(_get(params, path)) for path in link.params]
        if writer is None:
            continue
        for i in range(num_layers) if link.per_layer else [None]:
            values = [a[i] for a in arrays] if i is not None else arrays
            for name, tensor in zip(link.hf, link.to_hf(values), strict=True):
                writer.add(name.format(i=i), tensor.astype(dtype))


def to_host(array: jax.Array | np.ndarray) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array on this host."""
    if isinstance(array, np.ndarray) or array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --- whole models -----------------------------------------------------------------------------

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def load_hf(
    directory: str | Path,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    head: HeadInit = "zero",
    keep_lm_head: bool = False,
    preset: str | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> Loaded:
    """A jaxrm model from an HF Llama / Qwen2 / InternLM2 causal LM or reward model.

    A reward head in the files (`score` / `v_head`) is kept; otherwise one is made, zero
    (`head="zero"`, POLAR: rewards start at 0) or normal with std 0.02 (CodePMP).
    """
    directory = Path(directory)
    where = str(directory)
    hf = read_hf_config(directory)
    arch = detect_arch(hf, where)
    reader = WeightReader(directory)
    score_name, lm_name = head_names(arch)
    has_score = score_name in reader
    model_keys = model_config_from_hf(hf, arch, where)
    if preset is not None:
        _check_preset(preset, model_keys, where)
        model_keys["preset"] = preset
    model_keys.update(lm_head=keep_lm_head, reward_head_init=head)
    saved = hf.get("jaxrm") or {}  # the full config of a model jaxrm exported
    raw = {**saved, "model": {**saved.get("model", {}), **model_keys}}
    config = config_from_dict(apply_overrides(raw, overrides))

    mesh = mesh or make_mesh(fsdp=-1)
    rules = config.mesh.rules if rules is None else rules
    graphdef, abstract = abstract_model(config.model, mesh, rules)
    table = links(config.model, arch, score=has_score, lm_head=keep_lm_head)
    unknown = [n for n in unused_tensors(reader, table, config.model.num_layers) if n != lm_name]
    if unknown:
        raise UserError(
            f"{where}: tensors jaxrm does not know how to use: {', '.join(unknown[:5])}"
        )
    params = read_params(reader, table, abstract, config.model.num_layers, where)
    if not has_score:
        std = 0.0 if head == "zero" else 0.02
        value = std * np.asarray(jax.random.normal(jax.random.key(seed), abstract["score"].shape))
        params["score"] = _place(value.astype(abstract["score"].dtype), abstract["score"])
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
    return Loaded(nnx.merge(graphdef, params), config, directory if has_tokenizer else None)


def _check_preset(preset: str, model_keys: dict, where: str) -> None:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    differ = [k for k, v in preset_shape(preset).items() if model_keys.get(k) != v]
    if differ:
        shown = ", ".join(
            f"{k}={model_keys.get(k)!r} (preset {preset_shape(preset)[k]!r})" for k in differ
        )
        raise UserError(f"{where}: does not have the shape of preset {preset}: {shown}")


def export_hf(
    loaded: Loaded,
    out_dir: str | Path,
    arch: Arch | None = None,
    dtype: str = "float32",
    causal_lm: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes `loaded` as an HF reward model (or, with `causal_lm`, its LM) into a new `out_dir`."""
    config = loaded.config.model
    arch = arch or ("qwen2" if config.qkv_bias else "llama")
    if causal_lm and not config.lm_head:
        raise UserError(
            "this checkpoint has no LM head to export (it was trained without model.lm_head)"
        )
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose from {', '.join(EXPORT_DTYPES)}")
    out_dir = require_new_dir(out_dir, "export directory")
    hf = hf_config(config, arch, dtype, causal_lm)
    params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    if config.lora_rank:  # users get one ordinary model: adapters folded into the kernels
        params = merge_lora(params, config)
        config = dataclasses.replace(config, lora_rank=0)
    hf["jaxrm"] = config_to_dict(dataclasses.replace(loaded.config, model=config))
    layout = config
    if arch == "qwen2" and not config.qkv_bias:  # Qwen2 always has q/k/v biases: write zeros
        layout = dataclasses.replace(config, qkv_bias=True)
        for name, heads in (
            ("bq", config.num_heads),
            ("bk", config.num_kv_heads),
            ("bv", config.num_kv_heads),
        ):
            zeros = np.zeros((config.num_layers, heads, config.head_dim), np.float32)
            params["layers"]["attention"][name] = zeros
    table = links(layout, arch, score=not causal_lm, lm_head=causal_lm)

    primary = jax.process_index() == 0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = (
        Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent)) if primary else None
    )
    try:
        writer = ShardedWriter(staging, max_shard_bytes) if staging else None
        write_params(params, table, writer, config.num_layers, EXPORT_DTYPES[dtype])
        if staging is not None and writer is not None:
            writer.close()
            (staging / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            copy_tokenizer(loaded.tokenizer_dir, staging)
            (staging / "README.md").write_text(export_readme(hf, causal_lm))
            if out_dir.exists():
                out_dir.rmdir()
            staging.rename(out_dir)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def export_readme(hf: dict, causal_lm: bool) -> str:
    kind = hf["architectures"][0]
    if causal_lm:
        return f"# {kind} exported by jaxrm\n\nLoad with `AutoModelForCausalLM.from_pretrained(...)`.\n"
    remote = ", trust_remote_code=True" if hf["model_type"] == "internlm2" else ""
    auto = "AutoModel" if remote else "AutoModelForSequenceClassification"
    reward_token = hf.get("reward_token_id")
    append = (
        f"ids = ids + [{reward_token}]  # the reward token: the score is read there\n"
        if reward_token is not None
        else ""
    )
    return f"""# Reward model exported by jaxrm ({kind})

One scalar reward per sequence, read at its last non-padding token (`pad_token_id` =
{hf["pad_token_id"]}). Build the input text exactly as the model was trained (the `jaxrm` block of
config.json holds the full training config). For a POLAR model the text is

    prompt + "\\n" + reference + "<|reward|>" + prompt + "\\n" + candidate

with the tokenizer's BOS in front and the reward token appended.

```python
import torch
from transformers import AutoTokenizer, {auto}

tokenizer = AutoTokenizer.from_pretrained(PATH{remote})
model = {auto}.from_pretrained(PATH, torch_dtype=torch.float32{remote})
ids = tokenizer(text)["input_ids"]
{append}with torch.no_grad():
    reward = model(torch.tensor([ids])).logits[0, 0].item()
```
"""
