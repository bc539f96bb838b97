"""The YAML files of `polar-pool` and `codepmp-generate`: keys, model entries, sampling.

Every setting and model path is checked before a model is loaded, and a bad one is one line
naming the file and key. Paths resolve relative to the file.
"""

import dataclasses
import gc
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxrm.checkpoint.loading import find_checkpoint
from jaxrm.errors import UserError
from jaxrm.generate.endpoint import Endpoint, EndpointPolicy
from jaxrm.generate.sampler import Sampling
from jaxrm.generate.trajectories import LocalPolicy, generate_file, make_jobs, open_model

Row = dict[str, Any]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def read_settings(path: str | Path, allowed: dict[str, type], required: Sequence[str]) -> Row:
    """The YAML mapping at `path` with relative paths kept relative to it; unknown or missing
    keys and wrong types are errors naming the key."""
    path = Path(path)
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: must be a mapping of settings")
    for key, value in settings.items():
        if key not in allowed:
            raise UserError(f"{path}: unknown key '{key}' (known: {', '.join(allowed)})")
        if not isinstance(value, allowed[key]):
            raise UserError(f"{path}: '{key}' must be {_kind(allowed[key])}, got {value!r}")
    for key in required:
        if key not in settings:
            raise UserError(f"{path}: '{key}' is missing")
    return settings


def _kind(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(
        {str: "text", int: "a whole number", list: "a list", dict: "a mapping"}.get(t, t.__name__)
        for t in types
    )


def resolve_path(base: Path, value: str) -> str:
    return value if "://" in value or Path(value).is_absolute() else str(base / value)


@dataclasses.dataclass
class ModelEntry:
    """One model of a pool: where it is and how to sample from it."""

    name: str
    model: str | None  # a local model, or
    endpoint: Endpoint | None  # a served one
    overrides: list[str]
    tokenizer: str | None
    sampling: Sampling
    max_new_tokens: int
    template: str | None

    @classmethod
    def parse(
        cls, entry: Any, where: str, base: Path, defaults: Row, name: str | None = None
    ) -> "ModelEntry":
        if not isinstance(entry, dict):
            raise UserError(f"{where}: must be a mapping with 'model' or 'endpoint'")
        known = {"name", "model", "endpoint", "overrides", "tokenizer", "sampling", "template"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise UserError(
                f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})"
            )
        if ("model" in entry) == ("endpoint" in entry):
            raise UserError(f"{where}: give one of 'model' (a local model) or 'endpoint'")
        served = "endpoint" in entry
        for key in (() if name else ("name",)) + (() if served else ("model",)):
            if not isinstance(entry.get(key), str):
                raise UserError(f"{where}.{key}: must be text")
        if served and ("overrides" in entry or "tokenizer" in entry):
            raise UserError(f"{where}: 'overrides' and 'tokenizer' are for local models only")
        for key in ("tokenizer", "template"):
            if not isinstance(entry.get(key, ""), str):
                raise UserError(f"{where}.{key}: must be text")
        overrides = entry.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise UserError(f"{where}.overrides: must be a list of key=value texts")
        name = name or entry["name"]
        if not NAME.fullmatch(name):
            raise UserError(f"{where}.name: {name!r} must be letters, digits, '.', '_' or '-'")
        sampling = sampling_settings(entry.get("sampling", {}), f"{where}.sampling", defaults)
        tokenizer = entry.get("tokenizer")
        model = None if served else resolve_path(base, entry["model"])
        endpoint = Endpoint.parse(entry["endpoint"], f"{where}.endpoint") if served else None
        try:  # a wrong path fails now, not after the models before it have run
            if model is not None:
                find_checkpoint(model)
        except UserError as e:
            raise UserError(f"{where}.model: {e}") from None
        try:
            drawn = Sampling(sampling["temperature"], sampling["top_k"], sampling["top_p"])
        except UserError as e:
            raise UserError(f"{where}.sampling.{e}") from None
        return cls(
            name=name,
            model=model,
            endpoint=endpoint,
            overrides=overrides,
            tokenizer=resolve_path(base, tokenizer) if tokenizer else None,
            sampling=drawn,
            max_new_tokens=sampling["max_new_tokens"],
            template=entry.get("template"),
        )

    def settings(self) -> Row:
        """What an earlier run of this entry must have used for its output to be resumed."""
        where = {"model": self.model, "overrides": self.overrides}
        if self.endpoint is not None:
            where = self.endpoint.settings(self.endpoint.model or "")
        return {**where, **dataclasses.asdict(self.sampling)}


def sampling_settings(given: Any, where: str, defaults: Row) -> Row:
    if not isinstance(given, dict):
        raise UserError(f"{where}: must be a mapping")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(defaults)})")
    merged = {**defaults, **given}
    for key, value in merged.items():
        number = (int,) if key in ("top_k", "max_new_tokens") else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            raise UserError(f"{where}.{key}: must be a number, got {value!r}")
    if merged["max_new_tokens"] < 1:
        raise UserError(f"{where}.max_new_tokens: must be >= 1")
    return merged


def policy_seed(seed: int, name: str) -> int:
    """A policy's own sampling seed: stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def generate_with(
    entry: ModelEntry,
    prompts: list[tuple[str, Any]],
    samples: Sequence[int],
    out: Path,
    seed: int,
    batch_size: int,
    label: str,
) -> dict[str, Any]:
    """`samples[i]` responses of `entry`'s model to prompt i, into `out` (resuming it)."""
    settings = {**entry.settings(), "seed": seed, "prompts": label}
    if entry.endpoint is not None:
        source = EndpointPolicy(
            entry.endpoint, entry.name, entry.sampling, seed, entry.max_new_tokens
        )
        jobs = make_jobs(prompts, None, samples, None)
        return generate_file(
            source, jobs, out, entry.name, {**settings, "endpoint_model": source.model}
        )
    assert entry.model is not None
    model = open_model(entry.model, entry.overrides, entry.tokenizer)
    jobs = make_jobs(prompts, model.tokenizer, samples, model.max_positions)
    sampler = model.sampler(entry.sampling, seed, batch_size)
    local = LocalPolicy(model, sampler, entry.max_new_tokens)
    summary = generate_file(local, jobs, out, entry.name, {**settings, "eos_ids": model.eos_ids})
    del local, sampler, model
    gc.collect()  # one model in memory at a time
    return summary
