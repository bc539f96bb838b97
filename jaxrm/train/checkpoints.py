"""A run's training checkpoints: `RUN_DIR/checkpoints/<step>/`.

Each holds a model checkpoint's items (`checkpoint/items.py`) plus what resuming needs:

    opt_state/          the optimizer state
    data/               each host's data-iterator position (Grain)
    train_state/        the step and the seed, as JSON

Saves run in the background (Orbax's async checkpointing); the last `checkpoint.keep` are kept.
A step whose files cannot be read, or whose arrays differ from their saved checksums, is moved to
`RUN_DIR/damaged/<step>` and the run resumes from the newest intact one.
"""

import json
import sys
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
        same_hosts = self.saved_process_count(step) == jax.process_count()
        if same_hosts:
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax and TensorStore raise bare Exceptions for unreadable files
            raise unreadable(self.step_dir(step), e) from None
        arrays = {"params": restored["params"], "opt_state": restored["opt_state"]}
        verify_arrays(self.step_dir(step), arrays)
        if not same_hosts:
            data.set_state(self.regrouped_data_state(step, rows))
        return restored["params"], restored["opt_state"], restored["train_state"]

    def regrouped_data_state(self, step: int, rows: range) -> dict[str, Any]:
        """The data position of global batch `rows` at `step`, from the positions every saving
        host wrote. Each row of the global batch is its own stream (`data/pipeline.py`) and host
        i of N fed a contiguous block of rows, so the streams regroup for any number of hosts."""
        count = self.saved_process_count(step)
        streams, ended = [], []
        for index in range(count):
            path = self.step_dir(step, "data", f"process_{index}-of-{count}.json")
            state = json.loads(storage.read_text_file(path))
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
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()
