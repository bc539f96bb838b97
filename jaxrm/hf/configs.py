"""HF `config.json` <-> `ModelConfig`: reading and checking, detecting the architecture, writing.

An export's config carries what transformers and the peers that load it read: `architectures`,
one label, the pad and reward token ids, RoPE settings, and InternLM2's remote-code keys.
"""

import json
import math
import reprlib
from pathlib import Path
from typing import Any

from jaxrm.config import ModelConfig
from jaxrm.errors import UserError
from jaxrm.hf.layouts import ARCHS, Arch

# Sizes jaxrm reads from every config.json, and those it reads when present.
_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def read_hf_config(directory: Path, where: str) -> dict:
    """config.json of the HF model in `directory`, checked: every value jaxrm reads has the type
    and range it needs. `where` names the file in messages."""
    try:
        hf = json.loads((Path(directory) / "config.json").read_bytes())
    except FileNotFoundError:
        raise UserError(f"{where}: not found, so not a Hugging Face model directory") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad JSON, or bytes that are not UTF-8
        raise UserError(f"{where}: not valid UTF-8 JSON ({e})") from None
    _check_hf_config(hf, where)
    return hf


def _check_hf_config(hf: Any, where: str) -> None:
    if not isinstance(hf, dict):
        raise UserError(f"{where}: must hold a JSON object of settings, not {reprlib.repr(hf)}")
    for key in _SIZES:
        if key not in hf:
            raise UserError(f"{where}: key '{key}' is missing")
    for key in (*_SIZES, *_OPTIONAL_SIZES):
        value = hf.get(key)
        if value is None and key in _OPTIONAL_SIZES:
            continue
        if not (_is_int(value) and value >= 1):
            raise UserError(f"{where}: {key} must be a positive integer, got {reprlib.repr(value)}")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise UserError(
            f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
            f"({kv_heads})"
        )
    if hf.get("head_dim") is None and hidden % heads:
        raise UserError(
            f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
            "when head_dim is not given"
        )
    for key in ("rope_parameters", "rope_scaling", "jaxrm"):
        if not isinstance(hf.get(key) or {}, dict):
            raise UserError(f"{where}: {key} must be an object, got {reprlib.repr(hf[key])}")
    if not isinstance((hf.get("jaxrm") or {}).get("model", {}), dict):
        raise UserError(f"{where}: jaxrm.model must be an object")
    architectures = hf.get("architectures") or []
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise UserError(f"{where}: architectures must be a list of class names")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    for key, value in (("rope_theta", theta), ("rms_norm_eps", hf.get("rms_norm_eps", 1e-6))):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and 0 < value < math.inf):
            raise UserError(
                f"{where}: {key} must be a positive finite number, got {reprlib.repr(value)}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def head_labels(hf: dict, where: str) -> list[str]:
    """The attributes of a score head: [] for a reward model's one output; for a
    `problem_type: regression` head of several outputs, their names from id2label, in order.
    A head of several classes is a classifier, not a reward model."""
    labels = hf.get("id2label")
    if "num_labels" in hf:
        count, key = hf["num_labels"], "num_labels"
    else:
        count, key = (len(labels), "id2label") if isinstance(labels, dict) else (1, "")
    if isinstance(labels, dict) and len(labels) != count:
        raise UserError(f"{where}: num_labels ({count}) and id2label ({len(labels)}) disagree")
    if count == 1:
        return []
    if not _is_int(count) or count < 1 or hf.get("problem_type") != "regression":
        raise UserError(
            f"{where}: {key} says {reprlib.repr(count)} labels without problem_type "
            "regression; jaxrm imports reward models: one output, or one per attribute of a "
            "regression head"
        )
    if not isinstance(labels, dict):
        return [f"LABEL_{i}" for i in range(count)]
    try:
        return [str(labels[key]) for key in sorted(labels, key=int)]
    except ValueError:
        raise UserError(f"{where}: id2label keys must be the outputs' numbers") from None


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


def hf_config(
    config: ModelConfig,
    arch: Arch,
    dtype: str,
    causal_lm: bool,
    special_ids: dict[str, int | None] | None = None,
    per_token: bool = False,
) -> dict[str, Any]:
    """config.json for `arch`, as a reward model or (`causal_lm`) a causal LM; a process reward
    model (`per_token`) is a token classifier whose one-label head has no bias, as jaxrm's.

    `special_ids` ({"bos_token_id", "eos_token_id"}, from the tokenizer) go in when known. A
    reward model says `problem_type: regression`, so engines that pick an activation from it
    (vLLM: sigmoid for a one-label classifier otherwise) serve the raw reward."""
    if arch in ("llama", "internlm2") and config.qkv_bias:
        raise UserError(
            f"this model has q/k/v biases, which the {arch} layout cannot hold; export with --arch qwen2"
        )
    if arch == "internlm2" and per_token and not causal_lm:
        raise UserError(
            "a process reward model exports as a token classifier, which InternLM2's remote code "
            "does not have; export with --arch llama (or qwen2)"
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
        initializer_range=0.02,
        use_cache=True,
        torch_dtype=dtype,
        dtype=dtype,
    )
    common.update({k: v for k, v in (special_ids or {}).items() if v is not None})
    if config.reward_token_id is not None:
        common["reward_token_id"] = config.reward_token_id
    if arch == "internlm2" and config.num_labels > 1 and not causal_lm:
        raise UserError(
            "a multi-attribute head has several outputs; InternLM2's reward model (POLAR's remote "
            "code) has one. Export with --arch llama (or qwen2)"
        )
    if not causal_lm:
        names = config.attributes or ["LABEL_0"]
        common.update(
            num_labels=len(names),
            id2label={str(i): name for i, name in enumerate(names)},
            label2id={name: i for i, name in enumerate(names)},
            problem_type="regression",
        )
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
            # Read by InternLM's modeling_internlm2.py (POLAR's released config has them).
            pretraining_tp=1,
            **{"bos_token_id": 1, "eos_token_id": 2, **common},
        )
    family = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    head = "ForTokenClassification" if per_token else "ForSequenceClassification"
    kind = f"{family}ForCausalLM" if causal_lm else f"{family}{head}"
    extra: dict[str, Any] = {"head_dim": config.head_dim, "rope_parameters": rope}
    if per_token and not causal_lm:
        extra.update(token_classification_bias=False, classifier_dropout=0.0)
    if arch == "llama":
        extra.update(attention_bias=False, mlp_bias=False)
    else:
        extra.update(use_sliding_window=False, sliding_window=None)
    return dict(architectures=[kind], model_type=arch, **common, **extra)
