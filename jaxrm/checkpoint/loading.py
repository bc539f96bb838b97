"""The model behind a CHECKPOINT argument: a jaxrm checkpoint, a run directory (its newest
checkpoint) or a Hugging Face model directory.
"""

from collections.abc import Sequence
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from jaxrm import storage
from jaxrm.checkpoint.items import (
    CONFIG,
    CONFIG_FILE,
    PARAMS,
    TOKENIZER,
    is_checkpoint,
    restore_params,
)
from jaxrm.config import load_config
from jaxrm.errors import UserError
from jaxrm.hf.convert import load_hf
from jaxrm.model.decoder import Loaded, abstract_model
from jaxrm.sharding import Rules, make_mesh


def find_checkpoint(path: storage.PathLike) -> tuple[str, storage.PathLike]:
    """("jaxrm" | "hf", directory) for a CHECKPOINT argument (local or a URL)."""
    storage.check_bucket(path)
    path = path if storage.is_remote(path) else Path(path)
    if not storage.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if is_checkpoint(path):
        return "jaxrm", path
    if storage.is_file(storage.join(path, "config.json")):
        return "hf", path
    saved = run_checkpoints(path)
    if saved:
        return "jaxrm", saved[-1][1]
    raise UserError(
        f"{path}: not a jaxrm checkpoint ({PARAMS}/ + {CONFIG}/{CONFIG_FILE}), a run directory "
        "with checkpoints/ or a Hugging Face model directory (config.json)"
    )


def run_checkpoints(run: storage.PathLike) -> list[tuple[int, storage.PathLike]]:
    """(step, directory) of every complete checkpoint of a run directory, oldest first."""
    directory = storage.join(run, "checkpoints")
    steps = sorted(int(n) for n in storage.list_names(directory) if n.isdigit())
    candidates = [(step, storage.join(directory, str(step))) for step in steps]
    return [(step, path) for step, path in candidates if is_checkpoint(path)]


def load_model(
    path: storage.PathLike,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    overrides: Sequence[str] = (),
) -> Loaded:
    """The model behind a CHECKPOINT argument, in its sharding on `mesh` (default: all devices,
    FSDP). `overrides` change how it computes (`model.dtype=float32`), not its shape."""
    kind, directory = find_checkpoint(path)
    if kind == "hf":
        return load_hf(storage.local(directory), mesh=mesh, rules=rules, overrides=overrides)
    config = load_config(storage.local(storage.join(directory, CONFIG)) / CONFIG_FILE, overrides)
    mesh = mesh or make_mesh(fsdp=-1)
    rules = config.mesh.rules if rules is None else rules
    graphdef, target = abstract_model(config.model, mesh, rules)
    params = restore_params(directory, target)
    tokenizer = storage.join(directory, TOKENIZER)
    tokenizer_dir = storage.local(tokenizer) if storage.is_dir(tokenizer) else None
    return Loaded(nnx.merge(graphdef, params), config, tokenizer_dir)
