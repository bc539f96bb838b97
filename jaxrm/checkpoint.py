"""Checkpoints on disk, and finding the model behind a CHECKPOINT argument.

A jaxrm checkpoint is a directory of Orbax items:

    params/             the parameters (restore onto any mesh)
    config/jaxrm.yaml   the resolved config (model shape, template settings, ...)
    tokenizer/          the tokenizer files, when the model has them

A training checkpoint, `RUN_DIR/checkpoints/<step>/`, is the same plus what resuming needs:

    opt_state/          the optimizer state
    data/               each host's data-iterator position (Grain)
    train_state/        the step and the seed, as JSON

Orbax writes a checkpoint into a temporary directory and renames it when every item is complete,
so an interrupted save is never taken for a checkpoint. A CHECKPOINT argument may name a
checkpoint, a run directory (its newest checkpoint) or a Hugging Face model directory.
"""

import contextlib
import dataclasses
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from jaxrm.config import CheckpointConfig, Config, dump_config, load_config
from jaxrm.errors import UserError
from jaxrm.model import RewardModel, abstract_model
from jaxrm.sharding import Rules, make_mesh

PARAMS = "params"
CONFIG = "config"
CONFIG_FILE = "jaxrm.yaml"
TOKENIZER = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Kept with the tokenizer files: its stop ids (eos_token_id) are how a chat model ends a turn.
GENERATION_CONFIG = "generation_config.json"


@dataclasses.dataclass
class Loaded:
    model: RewardModel
    config: Config
    tokenizer_dir: Path | None


@dataclasses.dataclass
class FilesSave(ocp.args.CheckpointArgs):
    files: dict[str, bytes]


class FilesHandler(ocp.CheckpointHandler):
    """An item that is a few small files (the config, the tokenizer), written by host 0."""

    def save(self, directory: epath.Path, args: FilesSave) -> None:
        if jax.process_index() == 0:
            for name, data in args.files.items():
                (directory / name).write_bytes(data)

    def restore(self, directory: epath.Path, args: Any = None) -> epath.Path:
        return directory  # read as ordinary files (load_model, load_tokenizer)

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


ocp.args.register_with_handler(FilesHandler, for_save=True, for_restore=True)(FilesSave)


def model_items(params: dict, config: Config, tokenizer: Path | None) -> dict[str, Any]:
    """The Orbax save arguments of a model checkpoint (`tokenizer`: a directory or file)."""
    items: dict[str, Any] = {
        PARAMS: ocp.args.PyTreeSave(params),
        CONFIG: FilesSave({CONFIG_FILE: dump_config(config).encode()}),
    }
    files = tokenizer_files(tokenizer)
    if files:
        items[TOKENIZER] = FilesSave(files)
    return items


def item_handlers(params: dict) -> dict[str, ocp.CheckpointHandler]:
    return {
        PARAMS: _params_handler(params),
        CONFIG: FilesHandler(),
        TOKENIZER: FilesHandler(),
        "opt_state": ocp.PyTreeCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "train_state": ocp.JsonCheckpointHandler(),
    }


def save_model(
    path: str | Path, model: RewardModel, config: Config, tokenizer_dir: Path | None = None
) -> Path:
    """Writes a new model checkpoint at `path`; an existing non-empty `path` is refused."""
    path = require_new_dir(path, "checkpoint path")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    items = model_items(params, config, tokenizer_dir)
    handlers = {name: item_handlers(params)[name] for name in items}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)) as checkpointer:
        checkpointer.save(path, ocp.args.Composite(**items), force=True)
    return path


def _params_handler(params: dict) -> ocp.PyTreeCheckpointHandler:
    """Moves as little at once as `params` allow.

    Orbax stages arrays in host memory while it writes; capping that at the largest array shard
    on this host (at least 1 GB) keeps a save from needing a second copy of the model.
    """
    shard_bytes = [
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(params)
        if hasattr(x, "sharding")
    ]
    limit_gb = max(1, math.ceil(max(shard_bytes, default=0) / 1e9))
    return ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=limit_gb,
        save_device_host_concurrent_gb=limit_gb,
        restore_concurrent_gb=limit_gb,
    )


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


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write, renamed to `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        yield Path(staging)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


def require_new_dir(path: str | Path, what: str) -> Path:
    """`path`, absolute, if nothing would be overwritten there."""
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not empty; choose a new {what}")
    return path


SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_files(source: Path | None) -> dict[str, bytes]:
    """The tokenizer files of a directory, or of one tokenizer file (stored under its canonical
    name, with the side files beside it)."""
    if source is None:
        return {}
    if source.is_file():
        main = "tokenizer.json" if source.suffix == ".json" else "tokenizer.model"
        return {**_files_in(source.parent, SIDE_FILES), main: source.read_bytes()}
    return _files_in(source, (*TOKENIZER_FILES, GENERATION_CONFIG))


def _files_in(directory: Path, names: Sequence[str]) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in names if (directory / name).is_file()}


def copy_tokenizer(source: Path | None, target: Path) -> None:
    files = tokenizer_files(source)
    if files:
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / name).write_bytes(data)


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG / CONFIG_FILE).is_file() and (path / PARAMS).is_dir()


def require_local(path: str | Path, what: str) -> None:
    """Refuses a remote path (gs://...) where jaxrm reads and writes through the local filesystem."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(path)):
        raise UserError(
            f"{what} {path}: remote paths work for data.train and data.eval only; use a directory "
            "every host sees at the same path (a shared disk, or the bucket mounted with gcsfuse)"
        )


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
        from jaxrm.hf import load_hf

        return load_hf(directory, mesh=mesh, rules=rules, overrides=overrides)
    config = load_config(directory / CONFIG / CONFIG_FILE, overrides)
    mesh = mesh or make_mesh(fsdp=-1)
    rules = config.mesh.rules if rules is None else rules
    graphdef, target = abstract_model(config.model, mesh, rules)
    params = restore_params(directory / PARAMS, target)
    tokenizer = directory / TOKENIZER
    return Loaded(nnx.merge(graphdef, params), config, tokenizer if tokenizer.is_dir() else None)


def restore_params(directory: Path, target: dict) -> dict:
    """Parameters into the shapes and shardings of `target` (ShapeDtypeStructs)."""
    restore = ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))
    try:
        with ocp.Checkpointer(_params_handler(target)) as checkpointer:
            return checkpointer.restore(directory.absolute(), args=restore)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(
            f"{directory}: parameters do not match the config ({str(e).splitlines()[0]})"
        ) from None


class TrainCheckpoints:
    """The run's training checkpoints: `RUN_DIR/checkpoints/<step>/`, saved in the background,
    the last `checkpoint.keep` kept."""

    def __init__(self, run_dir: Path, config: CheckpointConfig, params: dict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=False,
        )
        self.directory = (run_dir / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=item_handlers(params)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_config(self, step: int) -> str:
        return (self.directory / str(step) / CONFIG / CONFIG_FILE).read_text()

    def saved_tokenizer(self, step: int) -> dict[str, bytes]:
        return tokenizer_files(self.directory / str(step) / TOKENIZER)

    def saved_process_count(self, step: int) -> int:
        """How many processes saved `step` (each saved its data-iterator position)."""
        return len(list((self.directory / str(step) / "data").glob("process_*.json")))

    def save(
        self,
        step: int,
        params: dict,
        opt_state: Any,
        data: grain.DatasetIterator,
        train_state: dict,
        config: Config,
        tokenizer: Path | None,
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        items = model_items(params, config, tokenizer)
        items["opt_state"] = ocp.args.PyTreeSave(opt_state)
        items["data"] = grain.checkpoint.CheckpointSave(data)
        items["train_state"] = ocp.args.JsonSave(train_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, params: dict, opt_state: Any, data: grain.DatasetIterator
    ) -> tuple[dict, Any, dict]:
        """(params, opt_state, train_state) of `step`, into the shardings of the abstract
        `params` and `opt_state`; `data` is moved to where the checkpoint left it."""
        args = ocp.args.Composite(
            params=_restore_args(params),
            opt_state=_restore_args(opt_state),
            data=grain.checkpoint.CheckpointRestore(data),
            train_state=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(step, args=args)
        return restored["params"], restored["opt_state"], restored["train_state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


def _restore_args(target: Any) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))
