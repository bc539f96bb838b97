"""The jaxrm checkpoint format: a model, its config and its tokenizer as Orbax items.

A jaxrm checkpoint is a directory of Orbax items:

    params/             the parameters (restore onto any mesh)
    config/jaxrm.yaml   the resolved config (model shape, template settings, ...)
    tokenizer/          the tokenizer files, when the model has them
    checksums/          a checksum of every array (`checkpoint/checksums.py`), checked on restore

A training checkpoint (`train/checkpoints.py`) is the same plus what resuming needs.

Orbax writes a checkpoint into a temporary directory and renames it when every item is complete,
so an interrupted save is never taken for a checkpoint.
"""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jaxrm import storage
from jaxrm.checkpoint.checksums import DamagedCheckpoint, checksums, verify
from jaxrm.config import Config, dump_config
from jaxrm.data.tokenizer import tokenizer_files
from jaxrm.errors import UserError, innermost
from jaxrm.model.decoder import RewardModel

PARAMS = "params"
CONFIG = "config"
CONFIG_FILE = "jaxrm.yaml"
TOKENIZER = "tokenizer"
CHECKSUMS = "checksums"
COMMIT_FILE = "commit_success.txt"  # Orbax's mark of a finished save on object storage


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


def model_items(
    params: dict, config: Config, tokenizer: Path | None, **arrays: Any
) -> dict[str, Any]:
    """The Orbax save arguments of a model checkpoint (`tokenizer`: a directory or file), with
    the checksums of `params` and of the other saved `arrays` (items by name)."""
    items: dict[str, Any] = {
        PARAMS: ocp.args.PyTreeSave(params),
        CONFIG: FilesSave({CONFIG_FILE: dump_config(config).encode()}),
        CHECKSUMS: ocp.args.JsonSave(checksums({PARAMS: params, **arrays})),
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
        CHECKSUMS: ocp.JsonCheckpointHandler(),
    }


def save_model(
    path: storage.PathLike,
    model: RewardModel,
    config: Config,
    tokenizer_dir: Path | None = None,
) -> storage.PathLike:
    """Writes a new model checkpoint at `path` (local or a URL); an existing non-empty `path` is
    refused."""
    path = storage.require_new_dir(path, "checkpoint path")
    storage.check_writable(path)
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


def is_checkpoint(path: storage.PathLike) -> bool:
    """Whether `path` holds a complete checkpoint. Locally Orbax renames a finished save into
    place; on object storage it writes into place and marks it complete with COMMIT_FILE."""
    if storage.is_remote(path) and not storage.is_file(storage.join(path, COMMIT_FILE)):
        return False
    return storage.is_file(storage.join(path, CONFIG, CONFIG_FILE)) and storage.is_dir(
        storage.join(path, PARAMS)
    )


def restore_params(checkpoint: storage.PathLike, target: dict) -> dict:
    """The parameters of the checkpoint directory `checkpoint`, in the shapes and shardings of
    `target` (ShapeDtypeStructs), checked against their saved checksums."""
    directory = storage.join(checkpoint, PARAMS)
    try:
        with ocp.Checkpointer(_params_handler(target)) as checkpointer:
            params = checkpointer.restore(storage.absolute(directory), args=restore_args(target))
    except Exception as e:  # Orbax and TensorStore raise bare Exceptions for unreadable files
        raise unreadable(directory, e) from None
    verify_arrays(checkpoint, {PARAMS: params})
    return params


# Reasons a read fails that say nothing about the checkpoint: the storage, the credentials or the
# memory of this machine. The checkpoint is left alone and the error is reported as it is.
NOT_DAMAGE = (
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "CANCELLED",
    "Permission denied",
    "Out of memory",
)


def unreadable(directory: storage.PathLike, error: BaseException) -> UserError:
    """A failed read of `directory` as one line: DamagedCheckpoint when the files are at fault
    (missing, truncated, corrupt), a plain UserError when the storage or this machine is."""
    outer, error = error, innermost(error)
    reason = " ".join(str(error).split())[:300]
    environmental = (
        isinstance(error, ConnectionError | TimeoutError | PermissionError | MemoryError)
        or any(word in reason for word in NOT_DAMAGE)
        or (storage.remote_reason(error) or storage.remote_reason(outer) or "").startswith(
            ("no credentials", "permission denied", "storage unreachable")
        )
    )
    if environmental:
        return UserError(f"cannot read {directory} ({reason}); the checkpoint was left as it is")
    return DamagedCheckpoint(
        f"{directory}: cannot be read into this model ({reason}); the checkpoint is damaged or "
        "was saved for another config"
    )


def verify_arrays(checkpoint: storage.PathLike, arrays: dict) -> None:
    """Checks restored `arrays` (items by name) against the checksums saved with `checkpoint`;
    checkpoints from before checksums were saved are taken as they are."""
    path = storage.join(checkpoint, CHECKSUMS, "metadata")
    if not storage.exists(path):
        return
    try:
        saved = json.loads(storage.read_text_file(path))
    except (OSError, ValueError) as e:
        raise unreadable(path, e) from None
    verify(saved, arrays, str(checkpoint))


def restore_args(target: Any) -> ocp.args.PyTreeRestore:
    """Orbax's arguments to restore a tree into the shapes and shardings of `target`."""
    return ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))
