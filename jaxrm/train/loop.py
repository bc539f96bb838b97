"""The train loop: one jitted step, sharded batches, metrics, evaluation and checkpoints.

    summary = train(load_config("configs/tiny_polar.yaml"))

Each step takes a global batch of packed rows (every host contributes its rows, split over the
mesh's `data` and `fsdp` axes), splits it into `train.micro_batches` parts whose gradients are
summed, clips, and applies the optimizer. Losses are normalised by the whole batch's counts
(examples, LM tokens), so accumulating micro-batches gives the gradient of the whole batch.

Resuming is automatic: when `output_dir/checkpoints/` holds a checkpoint, the run continues from
the newest one (parameters, optimizer state, step, data-iterator position), on whatever mesh this
run has, after checking that the config is compatible. SIGTERM (TPU preemption) and SIGINT save a
checkpoint at the current step before the process stops.
"""

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import yaml
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxrm import storage
from jaxrm.checkpoint.checksums import DamagedCheckpoint
from jaxrm.checkpoint.items import CONFIG, CONFIG_FILE, TOKENIZER
from jaxrm.checkpoint.loading import find_checkpoint, load_model
from jaxrm.config import (
    PARAM_SIZE_KEYS,
    Config,
    config_to_dict,
    dump_config,
    load_config,
    resolve_paths,
)
from jaxrm.data.pipeline import eval_batches, template_spec, train_batches
from jaxrm.data.tokenizer import tokenizer_files
from jaxrm.errors import UserError
from jaxrm.hf.configs import detect_arch, head_labels, read_hf_config
from jaxrm.hf.layouts import head_names
from jaxrm.hf.weight_files import WeightReader
from jaxrm.model.decoder import RewardModel, create_model
from jaxrm.train import losses
from jaxrm.train.checkpoints import TrainCheckpoints
from jaxrm.train.flops import peak_flops, train_flops
from jaxrm.train.metrics import MetricsLogger, SkippedRows
from jaxrm.train.run_lock import Held, run_lock
from jaxrm.train.trainer import Trainer, TrainState

# Keys that may change when a run resumes; any other difference stops the run.
RESUMABLE_CHANGES = (
    "output_dir",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.init_from",
    "checkpoint.",
    "mesh.",
    "data.eval",
    "data.tfds_data_dir",
    "data.tokenizer",
    "model.remat",
    "model.attention",
)
SHAPE_KEYS = (*PARAM_SIZE_KEYS, "qkv_bias", "tie_embeddings", "num_labels")


def train(config: Config) -> dict[str, Any]:
    """Trains (or resumes) the run `config.output_dir`; returns the final metrics."""
    _check(config)
    run_dir = storage.absolute(config.output_dir)
    with run_lock(run_dir) as held:
        return _train(config, run_dir, held)


def _train(config: Config, run_dir: storage.PathLike, held: Held) -> dict[str, Any]:
    mesh = config.mesh.make()
    config = _with_init_from(config)
    spec = template_spec(config)
    config = _with_reward_token(config, spec.build())
    tokenizer = Path(spec.tokenizer)
    trainer = Trainer(config, mesh)
    rows = trainer.host_rows
    checkpoints = TrainCheckpoints(run_dir, config.checkpoint, trainer.abstract_params)
    with contextlib.closing(checkpoints):  # also when the run stops before its loop
        checkpoints.check_room(trainer.abstract)
        data = train_batches(config, rows=rows)
        # A malformed first window stops the run before anything is written.
        first_batch = next(data)
        eval_data = eval_batches(config, config.data.eval, rows=rows) if config.data.eval else []

        unlogged: dict[str, Any] = {"steps": [], "seconds": 0.0}
        resumed = _resume(config, trainer, checkpoints, tokenizer, data)
        if resumed is None:
            state = trainer.init_state(_initial_model(config, mesh))
            start, trained = 0, {"tokens": 0, "flops": 0.0}
        else:
            state, start, train_state = resumed
            unlogged = {"steps": train_state.get("unlogged", []), "seconds": 0.0}
            unlogged["seconds"] = float(train_state.get("unlogged_seconds", 0.0))
            trained = {"tokens": int(train_state["tokens"]), "flops": float(train_state["flops"])}
            first_batch = next(data)
        if start >= config.train.steps:
            print(f"{run_dir} is already at step {start} of train.steps={config.train.steps}")
            return {"step": start}
        if jax.process_index() == 0:
            storage.write_bytes(storage.join(run_dir, "config.yaml"), dump_config(config).encode())
        trainer.compile(state, trainer.global_batch(first_batch))  # kept out of the throughput
        with contextlib.ExitStack() as stack:
            received = stack.enter_context(_stop_signals())
            stack.callback(checkpoints.wait)
            logger = None
            if jax.process_index() == 0:
                # A fresh start drops what an earlier attempt logged before its first checkpoint.
                resume_step = start if resumed is not None else -1
                logger = stack.enter_context(MetricsLogger(run_dir, resume_step=resume_step))
            bar = stack.enter_context(
                tqdm(
                    total=config.train.steps,
                    initial=start,
                    unit="step",
                    dynamic_ncols=True,
                    disable=jax.process_index() != 0,
                )
            )
            loop = _Loop(config, trainer, checkpoints, data, tokenizer, logger, bar, trained, held)
            state, step, final = loop.run(state, start, first_batch, eval_data, received, unlogged)
        if loop.skipped and (summary := loop.skipped.summary()):
            print(f"jaxrm: {summary}", file=sys.stderr)
        if received:
            raise Stopped(received[0], step, run_dir)
        return {"step": step, **final}


WORK_SUMS = ("tokens", "attention_pairs")


class _Loop:
    """The steps of one `train` call: log, evaluate and save on schedule."""

    def __init__(
        self,
        config: Config,
        trainer: Trainer,
        checkpoints: TrainCheckpoints,
        data: Any,
        tokenizer: Path,
        logger: MetricsLogger | None,
        bar: tqdm,
        trained: dict[str, float],
        held: Held,
    ):
        self.config, self.trainer, self.checkpoints = config, trainer, checkpoints
        self.held = held
        self.data, self.tokenizer, self.logger, self.bar = data, tokenizer, logger, bar
        self.trained = trained  # tokens and model FLOPs so far, up to the last logged step
        device = jax.devices()[0]
        # A CPU "device" count can be faked; the measured peak is the whole host's.
        chips = jax.process_count() if device.platform == "cpu" else jax.device_count()
        self.peak = peak_flops(device, config.model.dtype) * chips
        self.skipped = SkippedRows(logger) if config.data.skip_bad_rows else None

    def run(
        self,
        state: TrainState,
        step: int,
        batch: dict,
        eval_data: list,
        received: list[int],
        unlogged: dict[str, Any],
    ) -> tuple[TrainState, int, dict[str, float]]:
        """Trains from `step` to train.steps; `unlogged` holds the metrics (and seconds) of the
        steps a resumed checkpoint took after its last logged step, so the first log after a
        resume covers the same steps as in an uninterrupted run."""
        config, trainer = self.config, self.trainer
        steps, every = config.train.steps, config.train.eval_every
        pending: list[dict] = list(unlogged["steps"])
        self.trained = {
            key: self.trained[key] - value for key, value in self._unlogged_work(pending).items()
        }
        final: dict[str, float] = {}
        if eval_data and step == 0:  # where training starts from
            final.update(self.evaluate(state, eval_data, step))
        interval_start = time.perf_counter() - unlogged["seconds"]
        while step < steps:
            state, metrics = trainer.step(state, trainer.global_batch(batch), step)
            step += 1
            pending.append(metrics)
            self.bar.update(1)
            if step % config.train.log_every == 0 or step == steps:
                jax.block_until_ready(pending)  # steps run asynchronously: time them done
                final = self.log(pending, time.perf_counter() - interval_start, step)
                pending, interval_start = [], time.perf_counter()
            if eval_data and (step == steps or (every and step % every == 0)):
                started = time.perf_counter()
                final.update(self.evaluate(state, eval_data, step))
                interval_start += time.perf_counter() - started  # not training time
            multi_host_stop = jax.process_count() > 1 and self.checkpoints.reached_preemption(step)
            stop = bool(received) or multi_host_stop
            if step % config.checkpoint.every == 0 or step == steps or stop:
                self.save(state, step, pending, time.perf_counter() - interval_start)
            if stop:
                break
            if step < steps:
                batch = next(self.data)
        return state, step, final

    def log(self, pending: list[dict], seconds: float, step: int) -> dict[str, float]:
        host = jax.device_get(pending)
        _stop_if_not_finite(host, step)
        self.write_skipped(step)
        sums = {key: sum(float(m[key]) for m in host) for key in host[0]}
        metrics = losses.summarize(sums, self.config.loss)
        metrics["grad_norm"] = sums["grad_norm"] / len(host)
        metrics["lr"] = float(host[-1]["lr"])
        work = self._work(sums)
        self.trained = {key: self.trained[key] + work[key] for key in work}
        metrics.update(self.trained)
        metrics["tokens_per_sec"] = sums["tokens"] / seconds
        metrics["examples_per_sec"] = sums["examples"] / seconds
        metrics["mfu"] = work["flops"] / seconds / self.peak
        metrics["step_time"] = seconds / len(host)
        metrics["bad_rows"] = sums["bad_rows"]
        if self.logger:
            self.logger.log(step, metrics)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
        return metrics

    def _work(self, sums: dict[str, float]) -> dict[str, float]:
        """Tokens and model FLOPs (jaxrm/flops.py) of steps whose statistics add up to `sums`."""
        config = self.config
        lm_head = config.objective == "codepmp"
        flops = train_flops(config.model, sums["tokens"], sums["attention_pairs"], lm_head)
        return {"tokens": int(sums["tokens"]), "flops": flops}

    def evaluate(self, state: TrainState, eval_data: list, step: int) -> dict[str, float]:
        result = self.trainer.evaluate(state, eval_data)
        if self.logger:
            self.logger.log(step, result, prefix="eval/")
        self.bar.write(f"step {step}: eval " + " ".join(f"{k}={v:.4g}" for k, v in result.items()))
        return {f"eval/{k}": v for k, v in result.items()}

    def write_skipped(self, step: int) -> None:
        """The rows skipped for the steps up to `step` (on every host) to bad_rows.jsonl."""
        if self.skipped:
            self.skipped.write(step, self.data.take_skipped())

    def _unlogged_work(self, host: list[dict]) -> dict[str, float]:
        return self._work({k: sum(float(m[k]) for m in host) for k in WORK_SUMS})

    def save(self, state: TrainState, step: int, pending: list[dict], seconds: float) -> None:
        self.held.check()  # the run directory is still this run's
        host = jax.device_get(pending)
        _stop_if_not_finite(host, step)  # before anything of those steps is saved
        self.write_skipped(step)  # in bad_rows.jsonl before the checkpoint that read them
        not_logged = self._unlogged_work(host)
        train_state: dict[str, Any] = {"step": step, "seed": self.config.train.seed}
        train_state.update({key: self.trained[key] + not_logged[key] for key in self.trained})
        train_state["unlogged"] = [{k: float(v) for k, v in m.items()} for m in host]
        train_state["unlogged_seconds"] = seconds
        self.checkpoints.save(
            step,
            self.trainer.params(state),
            state.opt_state,
            self.data,
            train_state,
            self.config,
            self.tokenizer,
        )
        if self.logger:
            self.logger.sync()


def _stop_if_not_finite(host: list[dict], step: int) -> None:
    """Stops the run at the first of the steps `host` (ending at `step`) whose loss, gradient or
    update was not finite; the trainer did not apply it (trainer.py)."""
    for offset, metrics in enumerate(host):
        if int(metrics["nonfinite"]):
            bad = step - len(host) + 1 + offset
            raise UserError(
                f"step {bad}: the loss or gradient is not finite, so the update was not applied "
                "and the run stops without saving; its newest checkpoint is from before it "
                "(lower optimizer.lr, or look at the data this step read)"
            )


class Stopped(Exception):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int, run_dir: storage.PathLike):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
            f"{run_dir}/checkpoints/{step}; run the same command again to resume"
        )
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """Collects SIGTERM / SIGINT so the loop can save and stop; a second one acts at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _check(config: Config) -> None:
    if config.objective == "codepmp" and not config.model.lm_head:
        raise UserError("objective codepmp needs an LM head: set model.lm_head: true")
    for value in (config.data.tokenizer, config.train.init_from):
        if value is not None:
            storage.check_bucket(value)
    if storage.is_file(config.output_dir):
        raise UserError(f"output_dir {config.output_dir} is a file; name a directory")
    if jax.process_index() == 0:  # a denied write stops the run before anything is saved
        storage.check_writable(config.output_dir)
        storage.check_writable(storage.join(config.output_dir, "checkpoints"))


def _with_init_from(config: Config) -> Config:
    """The config with `data.tokenizer`, the reward token and the head's attributes defaulting
    to those the checkpoint `train.init_from` carries (a jaxrm checkpoint's reward token id; a HF
    directory's tokenizer)."""
    if config.train.init_from is None:
        return config
    kind, directory = find_checkpoint(config.train.init_from)
    data, model = config.data, config.model
    if data.tokenizer is None:
        source = storage.join(directory, TOKENIZER) if kind == "jaxrm" else directory
        if not storage.is_dir(source) or not tokenizer_files(storage.local(source)):
            raise UserError(
                f"train.init_from {config.train.init_from} carries no tokenizer; set data.tokenizer"
            )
        data = dataclasses.replace(data, tokenizer=str(source))
    if kind == "jaxrm" and data.reward_token is None and model.reward_token_id is None:
        saved = load_config(storage.local(storage.join(directory, CONFIG)) / CONFIG_FILE)
        model = dataclasses.replace(model, reward_token_id=saved.model.reward_token_id)
    if not model.attributes:  # a multi-attribute head goes on with its attributes
        model = dataclasses.replace(model, **_head_attributes(kind, directory))
    return dataclasses.replace(config, data=data, model=model)


def _head_attributes(kind: str, directory: storage.PathLike) -> dict[str, Any]:
    """The attributes (and their weights) of the reward head of checkpoint `directory`."""
    if kind == "jaxrm":
        saved = load_config(storage.local(storage.join(directory, CONFIG)) / CONFIG_FILE).model
        return {"attributes": saved.attributes, "attribute_weights": saved.attribute_weights}
    where = f"{str(directory).rstrip('/')}/config.json"
    hf = read_hf_config(storage.local(directory), where)
    if head_names(detect_arch(hf, where))[0] not in WeightReader(storage.local(directory)):
        return {}  # a causal LM: its reward head is made new
    attributes = head_labels(hf, where)
    weights = ((hf.get("jaxrm") or {}).get("model") or {}).get("attribute_weights")
    return {"attributes": attributes, "attribute_weights": weights if attributes else None}


def _with_reward_token(config: Config, template: Any) -> Config:
    """The config with `model.reward_token_id` = the id the template appends, so checkpoints
    and exports say where the reward is read."""
    model = config.model
    if model.reward_token_id not in (None, template.reward_id):
        raise UserError(
            f"data.reward_token is id {template.reward_id} but model.reward_token_id is "
            f"{model.reward_token_id}; set one of them only"
        )
    if template.tokenizer.vocab_size > model.vocab_size:
        raise UserError(
            f"the tokenizer has {template.tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{model.vocab_size}"
        )
    model = dataclasses.replace(model, reward_token_id=template.reward_id)
    return dataclasses.replace(config, model=model)


def _initial_model(config: Config, mesh: Mesh) -> RewardModel:
    model = create_model(config.model, config.train.seed, mesh, config.mesh.rules)
    if config.train.init_from is None:
        return model
    loaded = load_model(config.train.init_from, mesh, config.mesh.rules)
    differing = [
        key for key in SHAPE_KEYS if getattr(loaded.config.model, key) != getattr(config.model, key)
    ]
    if differing:
        details = ", ".join(
            f"{k}: {getattr(loaded.config.model, k)} there, {getattr(config.model, k)} here"
            for k in differing
        )
        raise UserError(
            f"train.init_from {config.train.init_from}: another model shape ({details})"
        )
    if config.model.lm_head and not loaded.config.model.lm_head:
        raise UserError(
            f"train.init_from {config.train.init_from} has no LM head; import it with "
            "--keep-lm-head for the codepmp objective"
        )
    fresh = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _update_from(fresh, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
    return nnx.merge(nnx.split(model)[0], fresh)


def _update_from(target: dict, source: dict) -> None:
    """Copies `source` into `target` where both have the key (LoRA adapters stay fresh)."""
    for key, value in source.items():
        if key not in target:
            continue
        if isinstance(value, dict):
            _update_from(target[key], value)
        else:
            target[key] = value


def _resume(
    config: Config,
    trainer: Trainer,
    checkpoints: TrainCheckpoints,
    tokenizer: Path,
    data: Any,
) -> tuple[TrainState, int, dict[str, Any]] | None:
    """(state, step, saved train state) of the newest intact checkpoint, None without any. The
    damaged steps after it are set aside; when none is intact, nothing is moved."""
    steps = checkpoints.steps()
    damaged: list[tuple[int, DamagedCheckpoint]] = []
    for step in steps:
        try:
            _check_resumable(config, checkpoints.saved_config(step))
            if checkpoints.saved_tokenizer(step) != tokenizer_files(tokenizer):
                raise UserError(
                    f"data.tokenizer ({config.data.tokenizer}) differs from the tokenizer the "
                    f"run in {config.output_dir} was trained with"
                )
            rows = trainer.host_rows
            params, opt_state, train_state = checkpoints.restore(
                step, trainer.abstract_params, trainer.abstract.opt_state, data, rows
            )
        except DamagedCheckpoint as e:
            damaged.append((step, e))
            continue
        for newer, damage in damaged:
            checkpoints.set_aside(newer, damage)
        trainable, frozen = trainer.split_params(params)
        return TrainState(trainable, frozen, opt_state), int(train_state["step"]), train_state
    if damaged:
        raise UserError(
            f"no checkpoint in {checkpoints.directory} can be read (step {damaged[0][0]}: "
            f"{damaged[0][1]}); nothing was moved: repair them, or move {checkpoints.directory} "
            "away to start the run over"
        )
    return None


def _check_resumable(config: Config, saved_text: str) -> None:
    saved_raw = yaml.safe_load(saved_text)
    # Runs saved before config paths were made absolute hold them relative to the cwd.
    resolve_paths(saved_raw, os.getcwd())
    saved = _flatten(saved_raw)
    current = _flatten(config_to_dict(config))
    differing = [
        key
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if differing:
        details = ", ".join(
            f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here" for k in differing
        )
        raise UserError(
            f"{config.output_dir} holds a run with another config ({details}); use a new "
            "output_dir or restore those settings"
        )


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "rules":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
