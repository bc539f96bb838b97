"""Experiment configuration: typed dataclasses loaded from YAML with `base:` parents and overrides.

    config = load_config("configs/tiny_polar.yaml", ["train.steps=20", "mesh.fsdp=8"])

Every key is checked against the dataclasses below. A key that does not exist, a value of the
wrong type, a choice outside its set or a number outside its range (`RANGES`) is a `UserError`
that names the key, the file (or the command line) it came from and, for unknown keys, the
nearest valid one.
"""

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from jax.sharding import Mesh

from jaxrm import storage
from jaxrm.errors import UserError
from jaxrm.presets import PRESETS, preset_shape
from jaxrm.sharding import DEFAULT_RULES, MESH_AXES, make_mesh

DType = Literal["float32", "bfloat16", "float16"]
LORA_TARGETS = ("wq", "wk", "wv", "wo", "gate", "up", "down")


# The model sizes that fix its parameters' shapes.
PARAM_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)


@dataclasses.dataclass(frozen=True)
class Allowed:
    """The numbers a config key may hold: finite ones from `low` to `high` (an end excluded where
    `open_low` / `open_high`) and those in `also`; `text` says which in an error message."""

    text: str
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    also: tuple[float, ...] = ()

    def admits(self, value: float) -> bool:
        above = self.low < value if self.open_low else self.low <= value
        below = value < self.high if self.open_high else value <= self.high
        return value in self.also or (math.isfinite(value) and above and below)


AT_LEAST_1 = Allowed("at least 1", low=1)
POSITIVE = Allowed("a positive finite number", low=0, open_low=True)
NOT_NEGATIVE = Allowed(">= 0 and finite", low=0)
FRACTION = Allowed("between 0 and 1", low=0, high=1)
BETA = Allowed("in [0, 1)", low=0, high=1, open_high=True)
TOKEN_ID = Allowed("a token id (0 or more)", low=0)

# The range of every numeric key, by config section. Checks across keys (a multiple of another
# key, below another key) are in the sections' __post_init__.
RANGES: dict[str, dict[str, Allowed]] = {
    "model": {
        **dict.fromkeys(PARAM_SIZE_KEYS, AT_LEAST_1),
        "max_position_embeddings": AT_LEAST_1,
        "rope_theta": POSITIVE,
        "rms_norm_eps": POSITIVE,
        "reward_token_id": TOKEN_ID,
        "lora_rank": Allowed("0 (off) or positive", low=0),
        "lora_alpha": POSITIVE,
    },
    "data": {
        "seq_len": Allowed("at least 8", low=8),
        "max_response_length": AT_LEAST_1,
        "pairs_per_row": AT_LEAST_1,
        "max_candidates": Allowed("at least 2", low=2),
        "max_steps": AT_LEAST_1,
        "num_workers": Allowed("0 or more", low=0),
        "reward_marker": TOKEN_ID,  # when given as an id rather than a string
        "reward_token": TOKEN_ID,
    },
    "loss": {"center_rewards": NOT_NEGATIVE, "lm_weight": NOT_NEGATIVE},
    "train": {
        **dict.fromkeys(("steps", "batch_size", "micro_batches", "log_every"), AT_LEAST_1),
        "eval_every": Allowed("0 (at the end) or more", low=0),
        # Grain's shuffle takes 32-bit seeds.
        "seed": Allowed("between 0 and 4294967295", low=0, high=2**32 - 1),
    },
    "optimizer": {
        "lr": POSITIVE,
        **dict.fromkeys(("warmup_ratio", "min_lr_ratio", "decay_ratio"), FRACTION),
        "b1": BETA,
        "b2": BETA,
        "weight_decay": NOT_NEGATIVE,
        "grad_clip": Allowed("positive or null", low=0, open_low=True),
    },
    "checkpoint": {"every": AT_LEAST_1, "keep": AT_LEAST_1},
    "mesh": {
        **dict.fromkeys(
            ("data", "fsdp", "tensor"), Allowed("a positive size or -1", low=1, also=(-1,))
        ),
        "context": Allowed("a positive size (the shards of each row's tokens)", low=1),
        "stage": Allowed("a positive size (the pipeline stages)", low=1),
    },
}

# The keys each kind of model.rope_scaling needs besides its type (as transformers checks them).
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_ranges(section: str, values: Any) -> None:
    """Raises a UserError for the first numeric key of config section `values` outside its range
    (None, where a key allows it, and strings, where it takes a string or a token id, are fine)."""
    for key, allowed in RANGES[section].items():
        value = getattr(values, key)
        if isinstance(value, int | float) and not allowed.admits(value):
            raise UserError(f"{section}.{key} must be {allowed.text}, got {value}")


@dataclasses.dataclass
class ModelConfig:
    """The decoder's shape (filled from `preset`, if any) and how it computes."""

    preset: str | None = "tiny"
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    # None, or {"type": "linear" | "dynamic" | "llama3", "factor": ..., ...} as in HF configs.
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    tie_embeddings: bool = False
    # The token the reward is read at and the padding token, as in HF configs (ids of the
    # model's own tokenizer; None where unknown).
    reward_token_id: int | None = None
    pad_token_id: int | None = None
    lm_head: bool = False
    reward_head_init: Literal["normal", "zero"] = "normal"
    # A multi-attribute head (HelpSteer-style regression): one output per named attribute, and
    # the weights that make them one reward for ranking, serving and RL (default: their mean).
    attributes: list[str] = dataclasses.field(default_factory=list)
    attribute_weights: list[float] | None = None
    dtype: DType = "bfloat16"
    param_dtype: DType = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    attention: Literal["xla", "splash", "cudnn"] = "xla"  # see jaxrm/model/attention.py
    # The layer stack as one scanned layer (short compiles) or unrolled; auto unrolls on CPU
    # except when generating (the scan updates the KV cache in place).
    layer_loop: Literal["auto", "scan", "unroll"] = "auto"
    # LoRA: rank 0 trains every parameter; rank > 0 adds adapters (alpha / rank scaling) to the
    # kernels named in lora_targets and trains only them and the reward head.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        check_ranges("model", self)
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_heads ({self.num_heads}) must be a multiple of "
                f"model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.reward_token_id is not None and self.reward_token_id >= self.vocab_size:
            raise UserError(
                f"model.reward_token_id ({self.reward_token_id}) must be below model.vocab_size "
                f"({self.vocab_size})"
            )
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            raise UserError(
                f"model.lora_targets: {', '.join(unknown)} not among {', '.join(LORA_TARGETS)}"
            )
        if self.attention == "cudnn" and self.dtype == "float32":
            raise UserError(
                "model.attention: cudnn has no float32 kernel; set model.dtype to bfloat16 or "
                "float16, or use model.attention: xla"
            )
        if self.head_dim % 2:
            raise UserError(f"model.head_dim ({self.head_dim}) must be even for RoPE")
        self._check_rope_scaling()
        self._check_attributes()

    @property
    def num_labels(self) -> int:
        """Outputs of the reward head: one per attribute, or the one reward."""
        return max(1, len(self.attributes))

    @property
    def reward_weights(self) -> list[float]:
        """How the head's outputs make the reward (the one output itself when it has one)."""
        if self.attribute_weights is not None:
            return list(self.attribute_weights)
        return [1.0 / self.num_labels] * self.num_labels

    def _check_attributes(self) -> None:
        names = self.attributes
        bad = next((n for n in names if not isinstance(n, str) or not n.strip()), None)
        if bad is not None:
            raise UserError(f"model.attributes: {bad!r} is not a name")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserError(f"model.attributes: {', '.join(repeated)} appears more than once")
        weights = self.attribute_weights
        if weights is None:
            return
        if len(weights) != self.num_labels or not names:
            raise UserError(
                f"model.attribute_weights has {len(weights)} weights; give one per entry of "
                f"model.attributes ({len(names)})"
            )
        if not all(math.isfinite(w) for w in weights):
            raise UserError(f"model.attribute_weights must be finite numbers, got {weights}")

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling or {}
        kind = scaling.get("type", scaling.get("rope_type", "default"))
        if kind not in ROPE_SCALING_KEYS:
            raise UserError(
                f"model.rope_scaling.type {kind!r} is not supported; use linear, dynamic or llama3"
            )
        for key in ROPE_SCALING_KEYS[kind]:
            if key not in scaling:
                raise UserError(f"model.rope_scaling.{key} is missing; {kind} scaling needs it")
        for key, value in scaling.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key not in ("type", "rope_type") and not (number and POSITIVE.admits(value)):
                raise UserError(
                    f"model.rope_scaling.{key} must be a positive number, got {value!r}"
                )
        if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise UserError(
                f"model.rope_scaling.high_freq_factor ({scaling['high_freq_factor']}) must exceed "
                f"low_freq_factor ({scaling['low_freq_factor']})"
            )


@dataclasses.dataclass
class DataConfig:
    """Where examples come from, how they are templated (METHODS.md) and how rows are packed."""

    # A path, a glob or a list of them: .jsonl, .parquet, .array_record (raw JSON rows, or a
    # `jaxrm data prepare` output directory) or tfds:NAME[/CONFIG][:VERSION]:SPLIT.
    train: str | list[str] | None = None
    eval: str | list[str] | None = None
    tfds_data_dir: str | None = None
    # A .model, tokenizer.json or a directory with either; default: the model checkpoint's.
    tokenizer: str | None = None
    seq_len: int = 512  # tokens per packed row
    # Longest templated sequence (POLAR's max_length); default seq_len // 2 so a pair fits a row.
    max_length: int | None = None
    max_response_length: int = 4096  # reference / candidate / response tokens kept (their head)
    wrapper: Literal["sft", "pretrain"] = "sft"  # a row's own "wrapper" field wins
    separator: str = "\n"  # between prompt and response in the "sft" wrapper
    reward_marker: str | int = "<|reward|>"  # between the reference and the candidate (POLAR)
    reward_token: str | int | None = (
        None  # appended to every sequence; default model.reward_token_id
    )
    shared_prefix: bool = True  # pack a prefix common to the candidates once
    pairs_per_row: int | None = None  # examples (pairs or lists) per row; default seq_len // 16
    max_candidates: int = 2  # responses a row may rank (a "ranked" list of more than 2: listwise)
    # Process rewards (objective prm): each step's text ends with this, then the reward token,
    # where the step's reward is read; rewards are read for at most max_steps steps of a row.
    step_separator: str = "\n"
    max_steps: int = 16
    # Skip malformed rows (counted as bad_rows, listed in RUN/bad_rows.jsonl) instead of
    # stopping; a run whose every row of an epoch is bad still stops.
    skip_bad_rows: bool = False
    shuffle: bool = True
    # Worker processes per host that read, template and pack (0: threads of the main process);
    # worker k of W packs rows k, k + W, ... of the host's batch, so the batches are the same
    # for any number (at most one worker per row is started).
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_ranges("data", self)
        if self.max_length is None:
            self.max_length = self.seq_len // 2
        if self.pairs_per_row is None:
            self.pairs_per_row = max(1, self.seq_len // 16)
        if not 8 <= self.max_length <= self.seq_len:
            raise UserError(
                f"data.max_length ({self.max_length}) must be between 8 and data.seq_len "
                f"({self.seq_len})"
            )


@dataclasses.dataclass
class LossConfig:
    """Bradley-Terry / Plackett-Luce over each example's ranked rewards, plus extras."""

    margin: bool = True  # subtract a row's "margin" from the best response's reward difference
    center_rewards: float = 0.0  # TRL's center_rewards_coefficient: c * mean((sum of rewards)^2)
    lm_weight: float = 1.0  # CodePMP's lambda on next-token loss of the chosen response

    def __post_init__(self) -> None:
        check_ranges("loss", self)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # packed rows per step, over all hosts
    seed: int = 0
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many parts
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate on data.eval at the end only
    init_from: str | None = None  # CHECKPOINT to start from (jaxrm or Hugging Face directory)

    def __post_init__(self) -> None:
        check_ranges("train", self)
        if self.batch_size % self.micro_batches:
            raise UserError(
                f"train.batch_size ({self.batch_size}) must be a multiple of "
                f"train.micro_batches ({self.micro_batches})"
            )


FUSED_OPTIMIZERS = ("lomo", "adalomo")  # updates fused into the backward pass (train/fused.py)


@dataclasses.dataclass
class OptimizerConfig:
    """optax optimizers and learning-rate schedules (b1 / b2 null: the optimizer's default)."""

    # lomo, adalomo: the update fused into the backward pass (train/fused.py)
    name: Literal["adamw", "lion", "adan", "adafactor", "sophia", "lomo", "adalomo"] = "adamw"
    lr: float = 1e-5
    # warmup_cosine: linear warm-up, cosine to min_lr_ratio * lr (POLAR);
    # wsd: warm-up, constant, the last decay_ratio of steps linearly to 0 (CodePMP)
    schedule: Literal["constant", "warmup_cosine", "wsd"] = "warmup_cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    decay_ratio: float = 0.1
    b1: float | None = None
    b2: float | None = None
    weight_decay: float = 0.0  # never applied to norms and biases
    grad_clip: float | None = 1.0  # global norm; null: off

    def __post_init__(self) -> None:
        check_ranges("optimizer", self)
        if self.schedule == "wsd" and self.warmup_ratio + self.decay_ratio > 1:
            raise UserError(
                f"optimizer.warmup_ratio ({self.warmup_ratio}) + optimizer.decay_ratio "
                f"({self.decay_ratio}) must not exceed 1 in the wsd schedule"
            )
        if self.name in FUSED_OPTIMIZERS and self.b1 is not None:
            raise UserError(f"optimizer.b1: {self.name} keeps no first moment; leave b1 unset")
        if self.name == "lomo" and self.b2 is not None:
            raise UserError("optimizer.b2: lomo keeps no second moment; leave b2 unset")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 100  # steps between saves (and a save at the end and on SIGTERM / SIGINT)
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True  # write in the background while training goes on

    def __post_init__(self) -> None:
        check_ranges("checkpoint", self)


@dataclasses.dataclass
class MeshConfig:
    """Device mesh sizes (-1: all remaining devices) and the logical-axis -> mesh-axis rules."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1  # shards of each packed row's tokens (context parallelism)
    stage: int = 1  # pipeline stages: contiguous blocks of layers on different devices
    rules: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    def __post_init__(self) -> None:
        check_ranges("mesh", self)
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise UserError(
                f"at most one of mesh.data ({self.data}), mesh.fsdp ({self.fsdp}), mesh.tensor "
                f"({self.tensor}) may be -1 (all remaining devices)"
            )
        self.rules = {**DEFAULT_RULES, **self.rules}
        for name, target in self.rules.items():
            if name not in DEFAULT_RULES:
                raise UserError(_unknown(f"mesh.rules.{name}", DEFAULT_RULES, "mesh.rules."))
            targets = target if isinstance(target, list) else [target]
            for axis in targets:
                if axis is not None and axis not in MESH_AXES:
                    raise UserError(
                        f"mesh.rules.{name}: {axis!r} is not a mesh axis "
                        f"(choose from {', '.join(MESH_AXES)} or null)"
                    )

    def make(self, devices: Sequence[Any] | None = None) -> Mesh:
        """The mesh of these sizes over `devices` (default: all)."""
        return make_mesh(
            self.data, self.fsdp, self.tensor, devices, context=self.context, stage=self.stage
        )


@dataclasses.dataclass
class Config:
    output_dir: str = "runs/jaxrm"
    objective: Literal["polar", "pairwise", "codepmp", "regression", "prm"] = "polar"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        if not self.output_dir.strip():
            raise UserError("output_dir is empty; name the run's directory")
        for key in ("reward_marker", "reward_token"):
            token = getattr(self.data, key)
            if isinstance(token, int) and token >= self.model.vocab_size:
                raise UserError(
                    f"data.{key} ({token}) must be a token id below model.vocab_size "
                    f"({self.model.vocab_size})"
                )
        self._check_context()
        self._check_stages()
        if self.optimizer.name in FUSED_OPTIMIZERS and self.model.lora_rank:
            raise UserError(
                f"optimizer.name: {self.optimizer.name} trains every parameter, fused into the "
                "backward pass; with model.lora_rank use another optimizer"
            )
        if self.objective == "prm" and self.model.attributes:
            raise UserError(
                "model.attributes: a process reward model judges steps with one output; "
                "multi-attribute heads are for objective regression (or ranking on their reward)"
            )
        scaling = self.model.rope_scaling or {}
        dynamic = scaling.get("type", scaling.get("rope_type")) == "dynamic"
        if dynamic and self.data.seq_len > self.model.max_position_embeddings:
            raise UserError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings}), past which dynamic RoPE scaling changes "
                "per sequence; jaxrm computes it only within that length"
            )

    def _check_stages(self) -> None:
        stages = self.mesh.stage
        if stages == 1:
            return
        if self.model.num_layers % stages:
            raise UserError(
                f"mesh.stage ({stages}) must divide model.num_layers ({self.model.num_layers}): "
                "each stage holds as many layers"
            )
        if self.mesh.context > 1:
            raise UserError(
                f"mesh.stage ({stages}) with mesh.context ({self.mesh.context}): pipeline stages "
                "do not split rows; use one of them"
            )
        if self.optimizer.name in FUSED_OPTIMIZERS:
            raise UserError(
                f"mesh.stage ({stages}): optimizer.name {self.optimizer.name} walks the layers "
                "itself, outside the pipeline; use another optimizer or mesh.stage: 1"
            )

    def _check_context(self) -> None:
        shards, seq_len = self.mesh.context, self.data.seq_len
        if shards == 1:
            return
        if self.model.attention == "cudnn":
            raise UserError(
                f"mesh.context ({shards}) splits rows, which model.attention: cudnn does not "
                "support; use xla (or splash on TPU)"
            )
        block = 128 if self.model.attention == "splash" else 1
        if seq_len % (shards * block):
            raise UserError(
                f"data.seq_len ({seq_len}) must be a multiple of mesh.context ({shards})"
                + (" x 128 with model.attention: splash" if block > 1 else "")
            )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads `path` (following `base:` parents), applies `key=value` overrides, validates."""
    raw: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        raw = _read_with_bases(path if storage.is_remote(path) else Path(path), origins, seen=())
    apply_overrides(raw, overrides, origins)
    raw.setdefault("output_dir", os.path.abspath(Config.output_dir))  # where the default lands
    return config_from_dict(raw, origins)


def apply_overrides(
    raw: dict, overrides: Sequence[str], origins: dict[str, str] | None = None
) -> dict:
    """Merges `key=value` overrides into nested plain config data, in place."""
    for override in overrides:
        key, value = parse_override(override)
        new = _nest(key, value)
        resolve_paths(new, os.getcwd())  # a relative path given here is relative to the cwd
        _merge(raw, new, {} if origins is None else origins, "the command line")
    return raw


def config_from_dict(raw: dict, origins: dict[str, str] | None = None) -> Config:
    """Builds a validated Config from nested plain data (as read from YAML)."""
    raw = dict(raw)
    model = raw.get("model")
    if isinstance(model, dict):
        preset = model.get("preset", ModelConfig.preset)
        if preset is not None and preset not in PRESETS:
            where = (origins or {}).get("model.preset", "the config")
            raise UserError(_unknown_value("model.preset", preset, PRESETS, where))
        raw["model"] = {**(preset_shape(preset) if preset else {}), **model}
    return _build(Config, raw, "", origins or {})


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=20` -> ("train.steps", 20); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"override {text!r} is not of the form key=value")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: value is not valid YAML ({_first_line(e)})") from e


def _read_with_bases(
    path: storage.PathLike, origins: dict[str, str], seen: tuple[storage.PathLike, ...]
) -> dict:
    """A config file's keys over those of its `base:` chain (local files or URLs)."""
    resolved = path if storage.is_remote(path) else Path(path).resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise UserError(f"{path}: config files name each other as base in a cycle: {chain}")
    if not storage.is_file(path):
        raise UserError(f"config file not found: {path}")
    text = storage.read_text_file(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({_first_line(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a config file must be a mapping of keys, not {type(data).__name__}"
        )
    resolve_paths(data, storage.parent(storage.absolute(path)))
    raw: dict = {}
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}: 'base' must be a path to a parent config file")
        if storage.is_remote(base) or Path(base).is_absolute():
            base_path = base if storage.is_remote(base) else Path(base)
        else:
            base_path = storage.join(storage.parent(path), base)
        raw = _read_with_bases(base_path, origins, (*seen, resolved))
    _merge(raw, data, origins, str(path))
    return raw


# Config keys that hold paths; a relative one in a config file means relative to that file.
PATH_KEYS = (
    ("output_dir",),
    ("data", "train"),
    ("data", "eval"),
    ("data", "tfds_data_dir"),
    ("data", "tokenizer"),
    ("train", "init_from"),
)


def resolve_paths(data: dict, directory: storage.PathLike) -> None:
    """Makes the relative paths of `data` absolute, taken relative to `directory` (a config
    file's own directory, or the working directory for the command line), so a config works
    from any directory and reads the same when dumped and loaded again. URLs, absolute paths and
    `tfds:` specs stay as they are."""
    for keys in PATH_KEYS:
        parent = data
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or keys[-1] not in parent:
            continue
        value = parent[keys[-1]]
        if isinstance(value, list):
            parent[keys[-1]] = [_relative_to(v, directory) for v in value]
        else:
            parent[keys[-1]] = _relative_to(value, directory)


def _relative_to(value: Any, directory: storage.PathLike) -> Any:
    if not isinstance(value, str) or not value or value.startswith("tfds:"):
        return value
    if storage.is_remote(value) or Path(value).expanduser().is_absolute():
        return value
    if storage.is_remote(directory):
        return str(storage.join(directory, value))
    return os.path.normpath(os.path.join(directory, value))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one
    silently, so a repeated key usually hides a mistake)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _merge(into: dict, new: dict, origins: dict[str, str], source: str, prefix: str = "") -> None:
    """Deep-merges `new` into `into` (new wins) and records where each leaf key came from."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origins, source, dotted + ".")
        else:
            into[key] = value
            origins[dotted] = source
            if isinstance(value, dict):
                for leaf in _leaf_keys(value, dotted + "."):
                    origins[leaf] = source


def _leaf_keys(tree: dict, prefix: str) -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _nest(dotted: str, value: Any) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _build(cls: type, raw: Any, prefix: str, origins: dict[str, str]) -> Any:
    where = origins.get(prefix.rstrip("."), "the config") if prefix else "the config"
    if not isinstance(raw, dict):
        raise UserError(f"config key '{prefix.rstrip('.')}' ({where}) must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            if isinstance(value, dict) and value:
                dotted = _leaf_keys(value, dotted + ".")[0]  # name what the user wrote in full
            source = origins.get(dotted, "the config")
            raise UserError(_unknown(dotted, _all_keys(Config), "", source))
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, dotted + ".", origins)
        else:
            kwargs[key] = _check_value(value, kind, dotted, origins.get(dotted, "the config"))
    try:
        return cls(**kwargs)
    except UserError as e:  # a check across keys: say where those keys were set
        sources = sorted({v for k, v in origins.items() if k.startswith(prefix)}) or ["defaults"]
        raise UserError(f"{e} (set in {', '.join(sources)})") from None


def _check_value(value: Any, kind: Any, key: str, source: str) -> Any:
    checked = _coerce(value, kind)
    if checked is _INVALID:
        raise UserError(f"config key '{key}' ({source}) must be {_describe(kind)}, got {value!r}")
    return checked


_INVALID = object()


def _coerce(value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            checked = _coerce(value, option)
            if checked is not _INVALID:
                return checked
        return _INVALID
    if origin is Literal:
        return value if value in typing.get_args(kind) else _INVALID
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            return _INVALID
        items = [_coerce(v, item) for v in value]
        return _INVALID if any(i is _INVALID for i in items) else items
    if kind is type(None):
        return None if value is None else _INVALID
    if kind is bool:
        return value if isinstance(value, bool) else _INVALID
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if kind is float:
        # YAML reads `1e-5` (no dot) as a string; accept it as the number the user meant.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _INVALID
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else _INVALID
    if kind is str:
        return value if isinstance(value, str) else _INVALID
    if kind is dict:
        return value if isinstance(value, dict) else _INVALID
    raise TypeError(f"config type {kind} is not handled")


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if origin is list:
        return f"a list of {_describe(typing.get_args(kind)[0])}"
    if kind is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, "a mapping"
    )


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            keys += _all_keys(kind, f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def _unknown(key: str, valid: Any, prefix: str, source: str | None = None) -> str:
    """One line naming `key` and, when one is close enough, the valid key meant."""
    candidates = [f"{prefix}{v}" for v in valid]
    section, _, leaf = key.rpartition(".")
    siblings = [c for c in candidates if c.rpartition(".")[0] == section]
    if siblings:  # the section is right: only the last part is misspelt
        nearest = difflib.get_close_matches(leaf, [c.rpartition(".")[2] for c in siblings], 1, 0.4)
        nearest = [f"{section}.{n}" if section else n for n in nearest]
    else:
        nearest = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    message = f"unknown config key '{key}'" + (f" ({source})" if source else "")
    return message + (f"; did you mean '{nearest[0]}'?" if nearest else "")


def _unknown_value(key: str, value: Any, valid: Any, source: str) -> str:
    nearest = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
    hint = f"did you mean '{nearest[0]}'?" if nearest else f"choose from {', '.join(valid)}"
    return f"config key '{key}' ({source}): unknown value {value!r}; {hint}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]
