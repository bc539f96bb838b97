"""The model behind a CHECKPOINT argument: a jaxrm checkpoint, a run directory (its newest
checkpoint) or a Hugging Face model directory.
"""

from collections.abc import Sequence
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

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
from jaxrm.storage import require_local


def find_checkpoint(path: str | Path) -> tuple[str, Path]:
    """("jaxrm" | "hf", directory) for a CHECKPOINT argument."""
    require_local(path, "checkpoint")
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if is_checkpoint(path):
        return "jaxrm", path
    if (path / "config.json").is_file():
        return "hf", path
    steps = sorted(
        (p for p in (path / "checkpoints").glob("*") if p.name.isdigit() and is_checkpoint(p)),
        key=lambda p: int(p.name),
    )
    if steps:
        return "jaxrm", steps[-1]
    raise UserError(
        f"{path}: not a jaxrm checkpoint ({PARAMS}/ + {CONFIG}/{CONFIG_FILE}), a run directory "
        "with checkpoints/ or a Hugging Face model directory (config.json)"
    )


def load_model(
    path: str | Path,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    overrides: Sequence[str] = (),
) -> Loaded:
    """The model behind a CHECKPOINT argument, in its sharding on `mesh` (default: all devices,
    FSDP). `overrides` change how it computes (`model.dtype=float32`), not its shape."""
    kind, directory = find_checkpoint(path)
    if kind == "hf":
        return load_hf(directory, mesh=mesh, rules=rules, overrides=overrides)
    config = load_config(directory / CONFIG / CONFIG_FILE, overrides)
    mesh = mesh or make_mesh(fsdp=-1)
    rules = config.mesh.rules if rules is None else rules
    graphdef, target = abstract_model(config.model, mesh, rules)
    params = restore_params(directory / PARAMS, target)
    tokenizer = directory / TOKENIZER
    return Loaded(nnx.merge(graphdef, params), config, tokenizer if tokenizer.is_dir() else None)
