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
import numpy as np
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
from jaxrm.data.pipeline import ROWS
from jaxrm.data.tokenizer import tokenizer_files
from jaxrm.errors import UserError, causes, innermost
from jaxrm.train.distributed import process_0_says


class TrainCheckpoints:
    """The run's training checkpoints: `RUN_DIR/checkpoints/<step>/`, saved in the background,
    the last `checkpoint.keep` kept."""

    def __init__(self, run_dir: storage.PathLike, config: CheckpointConfig, params: dict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=False,
            cleanup_tmp_directories=True,  # what a failed or killed save left behind
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
        saved = [
            n[len("process_") : -len(".json")].split("-of-")
            for n in names
            if n.startswith("process_") and n.endswith(".json")
        ]
        counts = {count for _, count in saved}
        if len(counts) != 1 or sorted(index for index, _ in saved) != [
            str(i) for i in range(int(next(iter(counts))))
        ]:
            raise DamagedCheckpoint(
                f"{self.step_dir(step, 'data')}: the data positions of some processes are "
                "missing; the checkpoint is damaged"
            )
        return int(counts.pop())

    def check_room(self, arrays: Any, step: int | None = None) -> None:
        """Stops in one line when a local run directory's disk has no room for a checkpoint of
        `arrays` (their uncompressed size: what a save may need at most)."""
        free = storage.free_bytes(self.directory)
        need = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(arrays))
        # Hosts sharing a disk may see it at different moments: process 0 decides.
        if process_0_says(free is None or free >= need):
            return
        if free is None or free >= need:
            raise UserError(
                f"{self.directory}: process 0 found no room on its disk for step {step}"
            )
        when = "" if step is None else f"step {step} is not saved and "
        raise UserError(
            f"{self.directory}: {free / 1e6:.1f} MB free on its disk, but a checkpoint takes up "
            f"to {need / 1e6:.1f} MB; {when}the run stops (free some space or set output_dir "
            f"elsewhere; saved steps: {self.steps() or 'none'})"
        )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed checkpoint write (disk full, read-only, denied) as one line. Orbax reports a
        background save's failure at the next save or wait, so no step is named."""
        try:
            yield
        except Exception as e:  # Orbax re-raises its background writer's error here
            reason = _storage_reason(e)
            if reason is None:
                raise
            raise UserError(
                f"{self.directory}: saving a checkpoint failed ({reason}); the run stops, the "
                f"steps saved before are intact (saved: {self.steps() or 'none'})"
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
        self.check_room((params, opt_state), step)
        items = model_items(params, config, tokenizer, opt_state=opt_state)
        items["opt_state"] = ocp.args.PyTreeSave(opt_state)
        items["data"] = grain.checkpoint.CheckpointSave(data)
        items["train_state"] = ocp.args.JsonSave(train_state)
        with self._writing():
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
        failure = None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax and TensorStore raise bare Exceptions for unreadable files
            failure = unreadable(self.step_dir(step), e)
        _raise_on_every_host(failure, f"step {step}")  # before the checksums' collectives
        arrays = {"params": restored["params"], "opt_state": restored["opt_state"]}
        verify_arrays(self.step_dir(step), arrays)
        count, fed = self.saved_process_count(step), [rows.start, rows.stop]
        state = None
        if count == jax.process_count():
            state = self._data_state(step, jax.process_index(), count)
        if not isinstance(state, dict) or state.get(ROWS, fed) != fed:
            state = self.regrouped_data_state(step, count, rows)
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

    def regrouped_data_state(self, step: int, count: int, rows: range) -> dict[str, Any]:
        """The data position of global batch `rows` at `step`, from the positions every saving
        host wrote. Each row of the global batch is its own stream (`data/pipeline.py`) and each
        host fed a contiguous block of rows (its state's `rows`; saved before they were recorded,
        block i of N equal ones), so the streams regroup for any number of hosts and any mesh
        (`count`: how many saved it)."""
        saved: dict[int, tuple[Any, Any]] = {}
        for index in range(count):
            state = self._data_state(step, index, count)
            if not isinstance(state, dict) or set(state) - {ROWS} != {"streams", "ended"}:
                raise UserError(
                    f"{self.step_dir(step)} was saved by {count} processes reading with "
                    f"data.num_workers > 0; resume it on {count} processes with the same mesh, "
                    "or the positions cannot be regrouped"
                )
            fed = len(state["streams"])
            start, _ = state.get(ROWS, [index * fed, (index + 1) * fed])
            for offset, position in enumerate(zip(state["streams"], state["ended"], strict=True)):
                saved[start + offset] = position
        missing = [row for row in rows if row not in saved]
        if missing:
            raise DamagedCheckpoint(
                f"{self.step_dir(step, 'data')}: no saved position for global batch rows "
                f"{missing[0]}..{missing[-1]}; the checkpoint is damaged"
            )
        return {
            "streams": [saved[row][0] for row in rows],
            "ended": [saved[row][1] for row in rows],
        }

    def set_aside(self, step: int, damage: DamagedCheckpoint) -> None:
        """Moves the damaged `step` out of the way of resuming (and of the next save of that
        step), to `RUN_DIR/damaged/<step>`, saying so on stderr."""
        target = storage.join(self.damaged, str(step))
        if jax.process_index() == 0:
            copies = 1
            while storage.exists(target):  # keep what an earlier resume set aside
                copies += 1
                target = storage.join(self.damaged, f"{step}-{copies}")
            print(f"jaxrm: {damage}; moved it to {target}", file=sys.stderr)
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
        # Orbax cleans up what failed saves left in a thread it starts with the manager and
        # awaits only at the next save; a run that stops before its first save (no room on the
        # disk) must wait for it too, or the thread meets the interpreter's shutdown and logs an
        # error (orbax-checkpoint is pinned: the private name is stable).
        self.manager._maybe_await_cleanup_tmp_directory()
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
    for cause in causes(error):
        if isinstance(cause, OSError) and cause.strerror:
            return f"{cause.strerror}: {cause.filename}"
    text = " ".join(str(innermost(error)).split())
    return text[:300] if any(word in text for word in STORAGE_FAILURES) else None


def _raise_on_every_host(failure: UserError | None, what: str) -> None:
    """Raises `failure` here, and on every other host an error of the same kind, so that all
    hosts of a run take the same way on (none waits in a collective the others left)."""
    code = 0 if failure is None else 1 if isinstance(failure, DamagedCheckpoint) else 2
    if jax.process_count() > 1:
        worst = int(multihost_utils.process_allgather(np.int32(code)).max())
        if failure is None and worst == 1:
            failure = DamagedCheckpoint(f"{what}: another host could not read its part")
        elif failure is None and worst == 2:
            failure = UserError(f"{what}: another host could not read its part")
    if failure is not None:
        raise failure
