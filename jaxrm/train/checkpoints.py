"""A run's training checkpoints: `RUN_DIR/checkpoints/<step>/`.

Each holds a model checkpoint's items (`checkpoint/items.py`) plus what resuming needs:

    opt_state/          the optimizer state
    data/               each host's data-iterator position (Grain)
    train_state/        the step and the seed, as JSON

Saves run in the background (Orbax's async checkpointing); the last `checkpoint.keep` are kept.
A step whose files cannot be read, or whose arrays differ from their saved checksums, is moved to
`RUN_DIR/damaged/<step>` and the run resumes from the newest intact one.
"""

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxrm import storage
from jaxrm.checkpoint.checksums import DamagedCheckpoint
from jaxrm.checkpoint.items import (
    CONFIG,
    CONFIG_FILE,
    TOKENIZER,
    item_handlers,
    model_items,
    restore_args,
    unreadable,
    verify_arrays,
)
from jaxrm.config import CheckpointConfig, Config
from jaxrm.data.tokenizer import tokenizer_files
from jaxrm.errors import UserError


class TrainCheckpoints:
    """The run's training checkpoints: `RUN_DIR/checkpoints/<step>/`, saved in the background,
    the last `checkpoint.keep` kept."""

    def __init__(self, run_dir: storage.PathLike, config: CheckpointConfig, params: dict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=False,
        )
        self.directory = storage.absolute(storage.join(run_dir, "checkpoints"))
        self.damaged = storage.absolute(storage.join(run_dir, "damaged"))
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=item_handlers(params)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The saved steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def step_dir(self, step: int, *names: str) -> storage.PathLike:
        return storage.join(self.directory, str(step), *names)

    def saved_config(self, step: int) -> str:
        path = self.step_dir(step, CONFIG, CONFIG_FILE)
        if not storage.is_file(path):
            raise DamagedCheckpoint(f"{path} is missing; the checkpoint is damaged")
        try:
            return storage.read_text_file(path)
        except (OSError, UnicodeDecodeError) as e:
            raise unreadable(path, e) from None

    def saved_tokenizer(self, step: int) -> dict[str, bytes]:
        saved = self.step_dir(step, TOKENIZER)
        return tokenizer_files(storage.local(saved)) if storage.is_dir(saved) else {}

    def saved_process_count(self, step: int) -> int:
        """How many processes saved `step` (each saved its data-iterator position)."""
        names = storage.list_names(self.step_dir(step, "data"))
        return sum(n.startswith("process_") and n.endswith(".json") for n in names)

    def check_room(self, arrays: Any, step: int | None = None) -> None:
        """Stops in one line when a local run directory's disk has no room for a checkpoint of
        `arrays` (their uncompressed size: what a save may need at most)."""
        free = storage.free_bytes(self.directory)
        need = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(arrays))
        if free is None or free >= need:
            return
        when = "" if step is None else f"step {step} is not saved and "
        raise UserError(
            f"{self.directory}: {free / 1e6:.1f} MB free on its disk, but a checkpoint takes up "
            f"to {need / 1e6:.1f} MB; {when}the run stops (free some space or set output_dir "
            f"elsewhere; saved steps: {self.steps() or 'none'})"
        )

    @contextlib.contextmanager
    def _writing(self, step: int | None = None) -> Iterator[None]:
        """A failed write of checkpoint `step` (disk full, read-only, denied) as one line."""
        try:
            yield
        except Exception as e:  # Orbax re-raises its background writer's error here
            reason = _storage_reason(e)
            if reason is None:
                raise
            what = "a checkpoint" if step is None else f"step {step}"
            raise UserError(
                f"{self.directory}: saving {what} failed ({reason}); the run stops, the steps "
                "saved before are intact"
            ) from None

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
        if not storage.is_remote(self.directory):  # a bucket has no directories to make
            self.directory.mkdir(parents=True, exist_ok=True)
        items = model_items(params, config, tokenizer, opt_state=opt_state)
        items["opt_state"] = ocp.args.PyTreeSave(opt_state)
        items["data"] = grain.checkpoint.CheckpointSave(data)
        items["train_state"] = ocp.args.JsonSave(train_state)
        self.check_room((params, opt_state), step)
        with self._writing(step):
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, params: dict, opt_state: Any, data: grain.DatasetIterator, rows: range
    ) -> tuple[dict, Any, dict]:
        """(params, opt_state, train_state) of `step`, into the shardings of the abstract
        `params` and `opt_state`; `data` (this host's global batch `rows`) is moved to where the
        checkpoint left it, also when another number of hosts saved it."""
        items = {
            "params": restore_args(params),
            "opt_state": restore_args(opt_state),
            "train_state": ocp.args.JsonRestore(),
        }
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax and TensorStore raise bare Exceptions for unreadable files
            raise unreadable(self.step_dir(step), e) from None
        arrays = {"params": restored["params"], "opt_state": restored["opt_state"]}
        verify_arrays(self.step_dir(step), arrays)
        if self.saved_process_count(step) == jax.process_count():
            state = self._data_state(step, jax.process_index(), jax.process_count())
        else:
            state = self.regrouped_data_state(step, rows)
        try:
            data.set_state(state)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise UserError(
                f"{self.step_dir(step)}: its data position does not fit this data pipeline "
                f"({type(e).__name__}: {e}); it was saved by another jaxrm version or data.* "
                "settings"
            ) from None
        return restored["params"], restored["opt_state"], restored["train_state"]

    def _data_state(self, step: int, index: int, count: int) -> Any:
        """What process `index` of `count` saved of its data position at `step`."""
        path = self.step_dir(step, "data", f"process_{index}-of-{count}.json")
        if not storage.is_file(path):
            raise DamagedCheckpoint(f"{path} is missing; the checkpoint is damaged")
        try:
            return json.loads(storage.read_text_file(path))
        except ValueError as e:
            raise unreadable(path, e) from None

    def regrouped_data_state(self, step: int, rows: range) -> dict[str, Any]:
        """The data position of global batch `rows` at `step`, from the positions every saving
        host wrote. Each row of the global batch is its own stream (`data/pipeline.py`) and host
        i of N fed a contiguous block of rows, so the streams regroup for any number of hosts."""
        count = self.saved_process_count(step)
        streams, ended = [], []
        for index in range(count):
            state = self._data_state(step, index, count)
            if not isinstance(state, dict) or set(state) != {"streams", "ended"}:
                raise UserError(
                    f"{self.step_dir(step)} was saved by {count} processes reading with "
                    f"data.num_workers > 0; resume it on {count} processes, or the positions "
                    "cannot be regrouped"
                )
            streams += state["streams"]
            ended += state["ended"]
        return {"streams": streams[rows.start : rows.stop], "ended": ended[rows.start : rows.stop]}

    def set_aside(self, step: int, damage: DamagedCheckpoint) -> None:
        """Moves the damaged `step` out of the way of resuming (and of the next save of that
        step), to `RUN_DIR/damaged/<step>`, saying so on stderr."""
        target = storage.join(self.damaged, str(step))
        if jax.process_index() == 0:
            print(f"jaxrm: {damage}; moved it to {target}", file=sys.stderr)
            storage.remove(target)
            storage.move(self.step_dir(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxrm set aside step {step}")
        self.manager.reload()

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


STORAGE_FAILURES = (
    "RESOURCE_EXHAUSTED",
    "PERMISSION_DENIED",
    "No space",
    "Read-only",
    "Disk quota",
)


def _storage_reason(error: BaseException) -> str | None:
    """The innermost reason of a write that failed for lack of space or permission, else None."""
    while error.__cause__ or error.__context__:
        if isinstance(error, OSError) and error.strerror:
            return f"{error.strerror}: {error.filename}"
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}"
    return text[:300] if any(word in text for word in STORAGE_FAILURES) else None
