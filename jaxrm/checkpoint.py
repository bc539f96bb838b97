"""Model checkpoints on disk, and finding the model behind a CHECKPOINT argument.

A jaxrm model checkpoint is a directory:

    jaxrm.yaml    the resolved config (model shape, template settings, ...), written last
    params/       the parameters, Orbax (restores onto any mesh)
    tokenizer/    the tokenizer files, when the model has them

A CHECKPOINT argument may name such a directory, a run directory (its newest complete
checkpoint under `checkpoints/`) or a Hugging Face model directory (`config.json`).
"""

import contextlib
import dataclasses
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxrm.config import Config, dump_config, load_config
from jaxrm.errors import UserError
from jaxrm.model import RewardModel, abstract_model
from jaxrm.sharding import Rules, make_mesh

CONFIG_FILE = "jaxrm.yaml"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclasses.dataclass
class Loaded:
    model: RewardModel
    config: Config
    tokenizer_dir: Path | None


def save_model(
    path: str | Path, model: RewardModel, config: Config, tokenizer_dir: Path | None = None
) -> Path:
    """Writes a new model checkpoint at `path`; an existing non-empty `path` is refused.

    Everything is written to a temporary sibling and renamed into place, so an interrupted or
    failed save never leaves something that looks like a checkpoint.
    """
    path = require_new_dir(path, "checkpoint path")
    with staged_directory(path) as staging:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        _checkpointer(params).save(staging / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        copy_tokenizer(tokenizer_dir, staging / TOKENIZER_DIR)
        (staging / CONFIG_FILE).write_text(dump_config(config))
    return path


@contextlib.contextmanager
def staged_directory(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to fill, renamed to `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if path.exists():
            path.rmdir()
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def require_new_dir(path: str | Path, what: str) -> Path:
    """`path`, absolute, if nothing would be overwritten there."""
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not empty; choose a new {what}")
    return path


def _checkpointer(params: dict) -> ocp.Checkpointer:
    """A synchronous checkpointer that moves as little at once as `params` allow.

    Orbax stages arrays in host memory while it writes; capping that at the largest array shard
    on this host (at least 1 GB) keeps a save from needing a second copy of the model.
    """
    shard_bytes = [
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(params)
    ]
    limit_gb = max(1, math.ceil(max(shard_bytes, default=0) / 1e9))
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=limit_gb,
        save_device_host_concurrent_gb=limit_gb,
        restore_concurrent_gb=limit_gb,
    )
    return ocp.Checkpointer(handler)


def copy_tokenizer(source: Path | None, target: Path) -> None:
    files = [source / name for name in TOKENIZER_FILES if source and (source / name).is_file()]
    if files:
        target.mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy2(file, target / file.name)


def find_checkpoint(path: str | Path) -> tuple[str, Path]:
    """("jaxrm" | "hf", directory) for a CHECKPOINT argument."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        return "jaxrm", path
    if (path / "config.json").is_file():
        return "hf", path
    steps = sorted(
        (
            p
            for p in (path / "checkpoints").glob("*")
            if p.name.isdigit() and (p / CONFIG_FILE).is_file()
        ),
        key=lambda p: int(p.name),
    )
    if steps:
        return "jaxrm", steps[-1]
    raise UserError(
        f"{path}: not a jaxrm checkpoint ({CONFIG_FILE} + {PARAMS_DIR}/), a run directory with "
        "checkpoints/ or a Hugging Face model directory (config.json)"
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
        from jaxrm.hf import load_hf

        return load_hf(directory, mesh=mesh, rules=rules, overrides=overrides)
    config = load_config(directory / CONFIG_FILE, overrides)
    mesh = mesh or make_mesh(fsdp=-1)
    rules = config.mesh.rules if rules is None else rules
    graphdef, target = abstract_model(config.model, mesh, rules)
    restore = ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))
    try:
        params = _checkpointer(target).restore((directory / PARAMS_DIR).absolute(), args=restore)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(
            f"{directory}: parameters do not match {CONFIG_FILE} ({str(e).splitlines()[0]})"
        ) from None
    tokenizer = directory / TOKENIZER_DIR
    return Loaded(nnx.merge(graphdef, params), config, tokenizer if tokenizer.is_dir() else None)
