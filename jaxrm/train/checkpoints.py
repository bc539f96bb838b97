"""A run's training checkpoints: `RUN_DIR/checkpoints/<step>/`.

Each holds a model checkpoint's items (`checkpoint/items.py`) plus what resuming needs:

    opt_state/          the optimizer state
    data/               each host's data-iterator position (Grain)
    train_state/        the step and the seed, as JSON

Saves run in the background (Orbax's async checkpointing); the last `checkpoint.keep` are kept.
"""

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from jaxrm.checkpoint.items import (
    CONFIG,
    CONFIG_FILE,
    TOKENIZER,
    item_handlers,
    model_items,
    restore_args,
)
from jaxrm.config import CheckpointConfig, Config
from jaxrm.data.tokenizer import tokenizer_files


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
            params=restore_args(params),
            opt_state=restore_args(opt_state),
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
