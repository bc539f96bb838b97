"""Whole models in both directions: `jaxrm import` (HF -> jaxrm) and `jaxrm export` (jaxrm -> HF).

    loaded = load_hf("hf_dir")                            # a base LM or a reward model
    export_hf(loaded, "out_dir", arch="llama")            # LlamaForSequenceClassification

Import reads the HF config (`hf/configs.py`), walks the layout table (`hf/layouts.py`) and
streams tensors into their target shardings (`hf/params.py`). Export writes safetensors shards,
a config transformers and InternLM's remote code load, the tokenizer and a README that says how
to load it.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrm.config import apply_overrides, config_from_dict, config_to_dict
from jaxrm.data.tokenizer import TOKENIZER_FILES, copy_tokenizer, load_tokenizer
from jaxrm.errors import UserError
from jaxrm.hf.configs import (
    detect_arch,
    head_labels,
    hf_config,
    model_config_from_hf,
    read_hf_config,
)
from jaxrm.hf.layouts import Arch, head_names, links
from jaxrm.hf.params import place_on_device, read_params, unused_tensors, write_params
from jaxrm.hf.weight_files import ShardedWriter, WeightReader
from jaxrm.model.decoder import Loaded, abstract_model, merge_lora
from jaxrm.presets import PRESETS, preset_shape
from jaxrm.sharding import Rules, make_mesh
from jaxrm.storage import local, require_new_dir, staged_directory

HeadInit = Literal["zero", "normal"]
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
    where = str(directory)
    directory = local(directory)  # a model in a bucket is read from a local copy
    config_file = f"{where.rstrip('/')}/config.json"
    hf = read_hf_config(directory, config_file)
    arch = detect_arch(hf, config_file)
    reader = WeightReader(directory)
    score_name, lm_name = head_names(arch)
    has_score = score_name in reader
    model_keys = model_config_from_hf(hf, arch, config_file)
    if has_score:
        model_keys["attributes"] = head_labels(hf, config_file)
    if preset is not None:
        _check_preset(preset, model_keys, where)
        model_keys["preset"] = preset
    model_keys.update(lm_head=keep_lm_head, reward_head_init=head)
    saved = hf.get("jaxrm") or {}  # the full config of a model jaxrm exported
    raw = {**saved, "model": {**saved.get("model", {}), **model_keys}}
    origins = {f"model.{key}": config_file for key in model_keys}
    config = config_from_dict(apply_overrides(raw, overrides, origins), origins)

    table = links(config.model, arch, score=has_score, lm_head=keep_lm_head)
    unknown = [n for n in unused_tensors(reader, table, config.model.num_layers) if n != lm_name]
    if unknown:
        raise UserError(
            f"{where}: tensors jaxrm does not know how to use: {', '.join(unknown[:5])}"
        )
    mesh = mesh or make_mesh(fsdp=-1)
    rules = config.mesh.rules if rules is None else rules
    graphdef, abstract = abstract_model(config.model, mesh, rules)
    params = read_params(reader, table, abstract, config.model.num_layers, where)
    if not has_score:
        std = 0.0 if head == "zero" else 0.02
        value = std * np.asarray(jax.random.normal(jax.random.key(seed), abstract["score"].shape))
        params["score"] = place_on_device(value.astype(abstract["score"].dtype), abstract["score"])
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
    reward_stats: dict[str, float] | None = None,
) -> str | Path:
    """Writes `loaded` as an HF reward model (or, with `causal_lm`, its LM) into a new `out_dir`.

    `reward_stats` ({"mean", "std"} of the rewards on calibration rows) go into config.json as
    OpenRLHF reads them (`mean`, `std`, `normalize_reward`: it then serves (r - mean) / std)."""
    config = loaded.config.model
    arch = arch or ("qwen2" if config.qkv_bias else "llama")
    if causal_lm and not config.lm_head:
        raise UserError(
            "this checkpoint has no LM head to export (it was trained without model.lm_head)"
        )
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose from {', '.join(EXPORT_DTYPES)}")
    out_dir = require_new_dir(out_dir, "export directory")
    per_token = loaded.config.objective == "prm"
    hf = hf_config(config, arch, dtype, causal_lm, _special_ids(loaded.tokenizer_dir), per_token)
    if reward_stats is not None:
        hf.update(normalize_reward=True, mean=reward_stats["mean"], std=reward_stats["std"])
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

    if jax.process_index() != 0:  # every host gathers its shards; host 0 writes the files
        write_params(params, table, None, config.num_layers, EXPORT_DTYPES[dtype])
        return out_dir
    # config.json goes last: transformers (and find_checkpoint) take a directory by it.
    with staged_directory(out_dir, last=("config.json",)) as staging:
        writer = ShardedWriter(staging, max_shard_bytes)
        write_params(params, table, writer, config.num_layers, EXPORT_DTYPES[dtype])
        writer.close()
        (staging / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        copy_tokenizer(loaded.tokenizer_dir, staging)
        (staging / "README.md").write_text(export_readme(hf, causal_lm))
    return out_dir


def _special_ids(tokenizer_dir: Path | None) -> dict[str, int | None]:
    if tokenizer_dir is None:
        return {}
    tokenizer = load_tokenizer(tokenizer_dir)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}


def export_readme(hf: dict, causal_lm: bool) -> str:
    kind = hf["architectures"][0]
    if causal_lm:
        return f"# {kind} exported by jaxrm\n\nLoad with `AutoModelForCausalLM.from_pretrained(...)`.\n"
    if kind.endswith("ForTokenClassification"):
        return process_readme(hf)
    if hf["num_labels"] > 1:
        return attribute_readme(hf)
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
{_serving_notes(hf)}"""


def process_readme(hf: dict) -> str:
    """The README of an exported process reward model."""
    kind, token = hf["architectures"][0], hf.get("reward_token_id")
    data = hf["jaxrm"]["data"]
    return f"""# Process reward model exported by jaxrm ({kind})

One reward per step of a solution. The input is BOS + prompt + {data["separator"]!r}, then for
each step its text + {data["step_separator"]!r} followed by the reward token (id {token}): a step's
reward is the head's output at its reward token, a logit (sigmoid: the probability that the
step is right). A solution's reward is the lowest of its steps' (`jaxrm score` gives that, every
step's and the last).

```python
import torch
from transformers import AutoTokenizer, AutoModelForTokenClassification

tokenizer = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForTokenClassification.from_pretrained(PATH, torch_dtype=torch.float32)
ids = tokenizer(prompt + {data["separator"]!r})["input_ids"]
for step in steps:
    ids += tokenizer(step + {data["step_separator"]!r}, add_special_tokens=False)["input_ids"]
    ids += [{token}]
with torch.no_grad():
    scores = model(torch.tensor([ids])).logits[0, :, 0]
step_rewards = scores[torch.tensor(ids) == {token}]
```

vLLM serves token classifiers with `--runner pooling`: its `token_classify` task returns every
token's score, and its STEP pooling reads the scores at `step_tag_id` = {token}. `jaxrm serve
PATH` answers POST /score {{"items": [{{"prompt", "steps"}}]}} with each solution's
`step_rewards`, `rewards` (the lowest) and `rewards_last`.
"""


def attribute_readme(hf: dict) -> str:
    """The README of an exported multi-attribute (regression) reward model."""
    kind, token = hf["architectures"][0], hf.get("reward_token_id")
    names = [hf["id2label"][str(i)] for i in range(hf["num_labels"])]
    model = hf["jaxrm"]["model"]
    weights = model["attribute_weights"] or [1 / len(names)] * len(names)
    append = (
        f"ids = ids + [{token}]  # the reward token: the scores are read there\n"
        if token is not None
        else ""
    )
    return f"""# Multi-attribute reward model exported by jaxrm ({kind})

One score per attribute ({", ".join(names)}: `id2label`), read at a sequence's last non-padding
token (`pad_token_id` = {hf["pad_token_id"]}), with `problem_type: regression`. The reward jaxrm
ranks, serves and trains preferences by is their weighted sum with weights {weights}
(`jaxrm.model.attribute_weights` in config.json). The input is built as in training: at most
`data.max_length` ({hf["jaxrm"]["data"]["max_length"]}) tokens, the prompt's tail and the
response's head where it is longer.

```python
import torch
from transformers import AutoTokenizer, AutoModelForSequenceClassification

tokenizer = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForSequenceClassification.from_pretrained(PATH, torch_dtype=torch.float32)
ids = tokenizer(prompt + {hf["jaxrm"]["data"]["separator"]!r})["input_ids"]
ids += tokenizer(response, add_special_tokens=False)["input_ids"]
{append}with torch.no_grad():
    scores = model(torch.tensor([ids])).logits[0]  # one per attribute
reward = float(scores @ torch.tensor({weights}))
```

vLLM (`vllm serve PATH --runner pooling`) answers POST /classify with `probs`, the outputs per
attribute (raw, by `problem_type: regression`); `jaxrm serve PATH` answers POST /score with
`rewards` (the weighted sum) and `scores` by attribute name, and every engine dialect it speaks.
"""


def _serving_notes(hf: dict) -> str:
    """How inference engines serve this export, and what each must be told."""
    internlm2 = hf["model_type"] == "internlm2"
    token = hf.get("reward_token_id")
    ends = (
        f"End every input with the reward token (id {token}): the engines below append nothing."
        if token is not None
        else "The engines below read the reward at the input's last token."
    )
    stats = (
        f"\nconfig.json carries OpenRLHF's `normalize_reward`, `mean` ({hf['mean']:.6g}) and `std` "
        f"({hf['std']:.6g}): OpenRLHF serves (r - mean) / std; the engines below serve raw r.\n"
        if "mean" in hf
        else ""
    )
    lmdeploy = (
        "- lmdeploy (InternLM2ForRewardModel): `lmdeploy serve api_server PATH --backend pytorch`;\n"
        '  POST /pooling {"input": [text]} -> `data[i]["data"]` (one raw float).\n'
        if internlm2
        else "- lmdeploy serves reward models of the InternLM2 layout only (`jaxrm export --arch "
        "internlm2`).\n"
    )
    remote = " --trust-remote-code" if internlm2 else ""
    return f"""
## Serving

{ends}
config.json says `problem_type: regression`, so engines that choose an activation by it serve
the raw reward.

- vLLM: `vllm serve PATH --runner pooling{remote}`. POST /pooling {{"input": [text]}} ->
  `data[i]["data"]`, a [score] per token, the reward at the last; POST /classify -> `probs[0]`.
  vLLM before 0.12 applies a sigmoid to one-label heads unless told otherwise: send
  `"use_activation": false` (0.12 and later) or serve with `--override-pooler-config
  '{{"softmax": false}}'` (earlier).
- SGLang: `python -m sglang.launch_server --model-path PATH --is-embedding{remote}`.
  POST /classify {{"text": [text]}} -> `item["embedding"][0]`; POST /v1/embeddings
  {{"input": text}} -> `data[0]["embedding"][0]` (raw).
{lmdeploy}- jaxrm: `jaxrm serve PATH` speaks all of these, OpenRLHF's /get_reward and /score_groups
  (GRPO groups with their shared prefix computed once), and appends the reward token itself.
{stats}"""
