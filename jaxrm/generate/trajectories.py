"""`jaxrm generate`: trajectory rows {prompt, policy, response} sampled from a causal LM.

    jaxrm generate MODEL --prompts prompts.jsonl --out trajectories.jsonl --n 2

MODEL is a Hugging Face Llama / Qwen2 / InternLM2 causal LM directory or a jaxrm checkpoint
with an LM head. Each prompt row's `prompt` (a string, or messages joined by "\n" as POLAR's
template joins them; no chat template) is tokenised with the tokenizer's BOS and completed
`--n` times. Rows are appended in prompt order as each batch finishes, each with its
`finish_reason`: "stop" (an EOS id) or "length".

Resuming: `OUT.generate.json` records the settings. Rerunning the same command keeps the rows
already in OUT (a line cut short by a kill is dropped) and generates the rest; every sample's
randomness depends only on (seed, prompt index, sample index), so in float32 the result equals
an uninterrupted run (see jaxrm/generate/sampler.py for bfloat16). Other settings for an existing OUT
are refused.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from jaxrm import storage
from jaxrm.checkpoint.loading import find_checkpoint, load_model
from jaxrm.data.rows import check_row
from jaxrm.data.sources import read_rows
from jaxrm.data.templates import flatten
from jaxrm.data.tokenizer import Tokenizer, load_tokenizer
from jaxrm.errors import UserError
from jaxrm.generate.endpoint import ENGINES, Answer, Endpoint, EndpointPolicy, guarantees
from jaxrm.generate.sampler import Sampler, Sampling
from jaxrm.hf.convert import load_hf
from jaxrm.model.decoder import Loaded
from jaxrm.sharding import make_mesh
from jaxrm.train.distributed import add_options as add_distributed_options
from jaxrm.train.distributed import initialize, process_0_says

# POLAR's sampling for policy trajectories (METHODS.md, section 1).
POLAR_SAMPLING = Sampling(temperature=1.0, top_p=0.9, top_k=50)
POLAR_MAX_NEW_TOKENS = 4096


@dataclasses.dataclass(frozen=True)
class Job:
    """One completion to make: a prompt as given, its token ids, and which sample of it."""

    prompt: Any
    ids: list[int]
    prompt_index: int
    sample: int


@dataclasses.dataclass
class Model:
    """A causal LM ready to sample from, with its tokenizer and stop ids."""

    loaded: Loaded
    tokenizer: Tokenizer
    eos_ids: list[int]

    @property
    def max_positions(self) -> int:
        return self.loaded.config.model.max_position_embeddings

    def sampler(self, sampling: Sampling, seed: int, batch_size: int) -> Sampler:
        """A sampler on all devices that never draws ids the tokenizer cannot decode."""
        limit = self.tokenizer.vocab_size
        return Sampler(self.loaded, local_mesh(), sampling, seed, batch_size, vocab_limit=limit)


def local_mesh() -> Mesh:
    """This process's devices: the hosts of a multi-host generation answer apart."""
    return make_mesh(fsdp=-1, devices=jax.local_devices())


class LocalPolicy:
    """Completes jobs with a model in this process."""

    def __init__(self, model: Model, sampler: Sampler, max_new_tokens: int):
        self.model, self.sampler, self.max_new_tokens = model, sampler, max_new_tokens

    def completions(self, jobs: Sequence[Job]) -> Iterator[list[tuple[int, Answer]]]:
        eos = set(self.model.eos_ids)
        for results in self.sampler.completions(
            [j.ids for j in jobs],
            [(j.prompt_index, j.sample) for j in jobs],
            self.max_new_tokens,
            self.model.eos_ids,
        ):
            yield [
                (
                    number,
                    Answer(
                        response_text(self.model.tokenizer, jobs[number].ids, done.tokens, eos),
                        done.finish,
                        len(done.tokens),
                    ),
                )
                for number, done in results
            ]


def open_model(
    path: str | Path,
    overrides: Sequence[str] = (),
    tokenizer: str | Path | None = None,
    extra_eos: Sequence[str] = (),
) -> Model:
    """The causal LM behind MODEL: an HF directory (its LM head kept) or a jaxrm checkpoint.

    EOS ids: the HF generation_config.json / config.json `eos_token_id` (an id or a list),
    the tokenizer's EOS, and `extra_eos` (tokens or ids)."""
    kind, directory = find_checkpoint(path)
    mesh = local_mesh()
    if kind == "hf":
        directory = storage.local(directory)
        loaded = load_hf(directory, mesh=mesh, keep_lm_head=True, overrides=overrides)
    else:
        loaded = load_model(directory, mesh=mesh, overrides=overrides)
    source = tokenizer or loaded.tokenizer_dir
    if source is None:
        raise UserError(f"{path}: no tokenizer files beside the model; give --tokenizer PATH")
    tok = load_tokenizer(source)
    if tok.vocab_size > loaded.config.model.vocab_size:
        raise UserError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than the model's "
            f"{loaded.config.model.vocab_size}"
        )
    eos = set(_configured_eos_ids([directory if kind == "hf" else None, loaded.tokenizer_dir]))
    eos.update(i for i in [tok.eos_id] if i is not None)
    eos.update(_stop_id(tok, t) for t in extra_eos)
    return Model(loaded, tok, sorted(eos))


def _configured_eos_ids(directories: Sequence[Path | None]) -> list[int]:
    """`eos_token_id` (an id or a list) of the first generation_config.json or config.json that
    sets one: HF directories have both, jaxrm checkpoints keep generation_config.json."""
    for name in ("generation_config.json", "config.json"):
        for directory in filter(None, directories):
            path = directory / name
            value = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
            if value is not None:
                return [value] if isinstance(value, int) else list(value)
    return []


def _stop_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a --eos token given as an id or as one vocabulary token (not registered as
    special: that would change how prompts are encoded and what responses decode to)."""
    token_id = int(token) if token.isdigit() else tokenizer.token_to_id(token)
    if token_id is None or not 0 <= token_id < tokenizer.vocab_size:
        raise UserError(f"--eos {token}: not a token id or a single token of {tokenizer.path}")
    return token_id


def read_prompts(spec: str | Sequence[str]) -> list[tuple[str, Any]]:
    """(where, prompt) of every prompt row of `spec`; a row without a prompt is an error."""
    prompts = [(where, check_row(row, "prompt", where)["prompt"]) for where, row in read_rows(spec)]
    if not prompts:
        raise UserError(f"{spec}: no prompt rows")
    return prompts


def make_jobs(
    prompts: Sequence[tuple[str, Any]],
    tokenizer: Tokenizer | None,
    samples: Sequence[int] | int,
    max_positions: int | None,
) -> list[Job]:
    """Every completion to make, prompt by prompt: `samples` of each prompt (one count for all,
    or one per prompt). With a tokenizer (a local model), a prompt that is empty or leaves no
    room in the model's context is an error naming its row; an endpoint encodes for itself."""
    counts = [samples] * len(prompts) if isinstance(samples, int) else samples
    jobs: list[Job] = []
    for index, ((where, prompt), count) in enumerate(zip(prompts, counts, strict=True)):
        if count == 0:
            continue
        ids = (
            [] if tokenizer is None else tokenizer.encode(flatten(prompt), add_special_tokens=True)
        )
        if tokenizer is not None and not ids:
            raise UserError(f"{where}: the prompt is empty and the tokenizer adds no BOS")
        if max_positions is not None and len(ids) >= max_positions:
            raise UserError(
                f"{where}: the prompt has {len(ids)} tokens, leaving no room in the model's "
                f"{max_positions} positions"
            )
        jobs += [Job(prompt, ids, index, s) for s in range(count)]
    return jobs


def is_endpoint(model: str) -> bool:
    return model.startswith(("http://", "https://"))


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".generate.json")


def rows_done(out: Path, jobs: Sequence[Job], policy: str, settings: dict[str, Any]) -> int:
    """How many of `jobs` an earlier run with the same `settings` already wrote to `out`.

    A last line cut short (the run was killed while writing) is removed. A new `out` gets its
    settings file; an existing one must have been written with the same settings."""
    record = settings_path(out)
    if out.exists() and not record.is_file():
        raise UserError(
            f"{out} already exists and was not written by jaxrm generate ({record} is missing)"
        )
    if not out.exists() or out.stat().st_size == 0:  # nothing generated yet: (re)start
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = record.with_name(record.name + ".tmp")
        staged.write_text(json.dumps(settings, indent=2) + "\n")
        staged.replace(record)
        out.touch()
        return 0
    try:
        before = json.loads(record.read_text())
    except json.JSONDecodeError:
        raise UserError(
            f"{record}: not valid JSON; remove {out} and it, or write elsewhere"
        ) from None
    changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise UserError(
            f"{out} was generated with other settings ({shown}); remove it or write elsewhere"
        )
    _drop_torn_line(out)
    # Split on newlines only: JSON text may hold U+2028 and other line breaks of str.splitlines.
    lines = out.read_text(encoding="utf-8").split("\n")[:-1]
    if len(lines) > len(jobs):
        raise UserError(f"{out} has {len(lines)} rows, more than the {len(jobs)} to generate")
    for number, (line, job) in enumerate(zip(lines, jobs[: len(lines)], strict=True), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(
                f"{out}:{number}: not a JSON row; remove it or write elsewhere"
            ) from None
        if (
            not isinstance(row, dict)
            or row.get("prompt") != job.prompt
            or row.get("policy") != policy
        ):
            raise UserError(
                f"{out}:{number}: does not belong to prompt {job.prompt_index} of the prompts "
                "file (was it changed?); remove it or write elsewhere"
            )
    return len(lines)


def _drop_torn_line(path: Path) -> None:
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def response_text(tokenizer: Tokenizer, prompt: list[int], new: list[int], eos: set[int]) -> str:
    """The text of the new tokens (a final EOS left out) as it continues the prompt: decoding
    them alone would lose a leading space that SentencePiece keeps inside the first token."""
    if new and new[-1] in eos:
        new = new[:-1]
    before = tokenizer.decode(prompt)
    whole = tokenizer.decode(prompt + new)
    return whole[len(before) :] if whole.startswith(before) else tokenizer.decode(new)


def generate_file(
    source: LocalPolicy | EndpointPolicy,
    jobs: Sequence[Job],
    out: str | Path,
    policy: str,
    settings: dict[str, Any],
    upload_every: float = 30.0,
) -> dict[str, Any]:
    """Writes one trajectory row per job to `out` as `source` answers, resuming an earlier run.

    A remote `out` (gs://...) is written locally and uploaded in parts at most every
    `upload_every` seconds (`storage.RemoteAppend`); a rerun goes on from the parts uploaded.
    With several processes (the hosts of a slice), each writes its share of the jobs to its own
    part and process 0 merges the parts into `out` (`_generate_parts`)."""
    if source.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {source.max_new_tokens}")
    if jax.process_count() > 1:
        return _generate_parts(source, jobs, out, policy, settings, upload_every)
    return _generate_one(source, jobs, out, policy, settings, upload_every)


def _generate_one(
    source: LocalPolicy | EndpointPolicy,
    jobs: Sequence[Job],
    out: str | Path,
    policy: str,
    settings: dict[str, Any],
    upload_every: float,
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        remote = None
        if storage.is_remote(out):
            remote = storage.RemoteAppend(out, [settings_path(Path(storage.name(out))).name])
            stack.callback(remote.close)
            out = remote.local
        summary = _generate_rows(source, jobs, Path(out), policy, settings, remote, upload_every)
        if remote is not None:
            remote.finish()
        return summary


def write_once(write: Callable[[], None], what: str) -> None:
    """Runs `write` on process 0 alone, and has every process wait until it is done, so that
    the hosts of a multi-host run do not all write the same file."""
    if jax.process_index() == 0:
        write()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxrm: {what} written")


def part_path(out: str | Path, index: int, count: int) -> str:
    return f"{out}.host-{index:05d}-of-{count:05d}"


def _generate_parts(
    source: LocalPolicy | EndpointPolicy,
    jobs: Sequence[Job],
    out: str | Path,
    policy: str,
    settings: dict[str, Any],
    upload_every: float,
) -> dict[str, Any]:
    """Process i of N answers jobs [i * J / N, (i + 1) * J / N) into its own part, resuming it;
    once every part is written, process 0 concatenates them into `out` (written whole, with the
    settings record a one-process run writes: the same file), and removes the parts. Every
    process must see the parts at the same paths (gs://, or a disk they share)."""
    from jax.experimental import multihost_utils

    index, count = jax.process_index(), jax.process_count()
    whole = {**settings, "policy": policy, "max_new_tokens": source.max_new_tokens}
    whole["rows"] = len(jobs)
    if process_0_says(_merged_already(out, whole)):
        return {"rows": len(jobs), "resumed_from": len(jobs), "process": index, "merged": str(out)}
    start, end = index * len(jobs) // count, (index + 1) * len(jobs) // count
    share = {**settings, "part": f"{index} of {count}"}
    part = part_path(out, index, count)
    summary = _generate_one(source, jobs[start:end], part, policy, share, upload_every)
    multihost_utils.sync_global_devices("jaxrm generate: every part written")
    if index == 0:
        bounds = [(i * len(jobs) // count, (i + 1) * len(jobs) // count) for i in range(count)]
        parts = [(part_path(out, i, count), b - a) for i, (a, b) in enumerate(bounds)]
        _merge(parts, out, whole)
    multihost_utils.sync_global_devices("jaxrm generate: parts merged")
    return {**summary, "process": index, "processes": count, "merged": str(out)}


def _merged_already(out: str | Path, whole: dict[str, Any]) -> bool:
    """Whether `out` is the finished file of these settings (a merge writes it whole)."""
    if not storage.exists(out):
        return False
    record = f"{out}.generate.json"
    try:
        before = json.loads(storage.read_text_file(record))
    except (UserError, json.JSONDecodeError):
        before = None
    lines = 0
    with storage.open_read(out) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines += block.count(b"\n")
    if before != whole or lines != whole["rows"]:
        raise UserError(
            f"{out} already exists and is not the finished output of these settings (a "
            "one-process run that did not finish, or other settings); finish it with one "
            "process, or remove it"
        )
    return True


def _merge(parts: Sequence[tuple[str, int]], out: str | Path, whole: dict[str, Any]) -> None:
    """`out` as the concatenation of `parts` (path, rows each), and its settings record."""
    missing = [part for part, _ in parts if not storage.is_file(part)]
    if missing:
        raise UserError(
            f"process 0 cannot see {missing[0]}: the hosts must write to storage all of them "
            "see (gs://, or a shared disk)"
        )
    record = f"{out}.generate.json"
    storage.write_bytes(record, (json.dumps(whole, indent=2) + "\n").encode())
    with storage.staged_file(out) as staging, open(staging, "wb") as merged:
        for part, rows in parts:
            lines = 0
            with storage.open_read(part) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    merged.write(block)
                    lines += block.count(b"\n")
            if lines != rows:
                raise UserError(f"{part} has {lines} rows, not {rows}; rerun to finish it")
    for part, _ in parts:
        storage.remove(part)
        storage.remove(f"{part}.generate.json")


def _generate_rows(
    source: LocalPolicy | EndpointPolicy,
    jobs: Sequence[Job],
    out: Path,
    policy: str,
    settings: dict[str, Any],
    remote: storage.RemoteAppend | None,
    upload_every: float,
) -> dict[str, Any]:
    settings = {
        **settings,
        "policy": policy,
        "max_new_tokens": source.max_new_tokens,
        "rows": len(jobs),
    }
    done = rows_done(out, jobs, policy, settings)
    if remote is not None:
        remote.upload_side(settings_path(out).name)
    counts = {"rows": len(jobs), "resumed_from": done, "new_tokens": 0, "stop": 0, "length": 0}
    started = time.perf_counter()
    bar = tqdm(
        total=len(jobs), initial=done, unit="seq", desc=f"generate {policy}", dynamic_ncols=True
    )
    todo = jobs[done:]
    finished: dict[int, str] = {}  # rows finished out of order, waiting for the ones before
    written = 0
    with bar, open(out, "a", encoding="utf-8") as f:
        for results in source.completions(todo):
            for number, answer in results:
                row = {"prompt": todo[number].prompt, "policy": policy, "response": answer.text}
                finished[number] = json.dumps(
                    {**row, "finish_reason": answer.finish}, ensure_ascii=False
                )
                counts["new_tokens"] += answer.tokens
                counts[answer.finish] += 1
            while written in finished:  # in prompt order, so a rerun knows where to go on
                f.write(finished.pop(written) + "\n")
                written += 1
            f.flush()
            os.fsync(f.fileno())
            if remote is not None:
                remote.flush(upload_every)
            bar.set_postfix_str(
                f"{counts['new_tokens'] / (time.perf_counter() - started):.1f} tok/s"
            )
            bar.update(len(results))
    seconds = time.perf_counter() - started
    summary = {
        **counts,
        "seconds": round(seconds, 3),
        "tokens_per_sec": counts["new_tokens"] / max(seconds, 1e-9),
    }
    if isinstance(source, EndpointPolicy):
        summary |= {"retries": source.retried, "guarantees": guarantees(source.endpoint.engine)}
    return summary


def check_run_settings(seed: int, batch_size: int, prefix: str) -> None:
    """One-line errors for a seed or batch size jaxrm cannot use (`prefix`: "--" or a YAML path)."""
    if not 0 <= seed < 2**32:
        raise UserError(f"{prefix}seed must be in [0, 2**32), got {seed}")
    if batch_size < 1:
        raise UserError(
            f"{prefix}batch{'-' if prefix == '--' else '_'}size must be >= 1, got {batch_size}"
        )


def add_sampling_options(parser: argparse.ArgumentParser, defaults: Sampling) -> None:
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help="0 is greedy (default %(default)s)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=defaults.top_p,
        help="nucleus mass, 1 is off (default %(default)s)",
    )
    parser.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="0 is off (default %(default)s)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=POLAR_MAX_NEW_TOKENS,
        help="per response (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="sequences decoded together (default 32)"
    )


def sampling_from(args: argparse.Namespace) -> Sampling:
    try:
        return Sampling(args.temperature, args.top_k, args.top_p)
    except UserError as e:  # name the flag: "top_p must ..." -> "--top-p must ..."
        name, rest = str(e).split(" ", 1)
        raise UserError(f"--{name.replace('_', '-')} {rest}") from None


def add_model_arguments(parser: argparse.ArgumentParser, endpoints: bool = False) -> None:
    """MODEL, its config overrides, tokenizer and extra stop tokens: what `open_model` takes."""
    kinds = "HF causal LM directory or jaxrm checkpoint"
    if endpoints:
        kinds += (
            ", or an OpenAI-compatible API's base URL (http://HOST:PORT/v1: vLLM, SGLang, "
            "lmdeploy or jaxrm serve-lm)"
        )
    parser.add_argument("model", metavar="MODEL", help=kinds)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config changes, e.g. model.dtype=float32"
    )
    parser.add_argument("--tokenizer", help="tokenizer path when MODEL has none beside it")
    parser.add_argument(
        "--eos",
        action="append",
        default=[],
        metavar="TOKEN",
        help="one more stop token (text or id; an endpoint's: an id); repeatable",
    )


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    gen = commands.add_parser(
        "generate",
        help="sample responses to prompts from a causal LM (POLAR / CodePMP data)",
        description="Complete every prompt row {prompt} of --prompts --n times with MODEL (a "
        "Hugging Face Llama / Qwen2 / InternLM2 causal LM directory, or a jaxrm checkpoint with an "
        "LM head) and append trajectory rows {prompt, policy, response, finish_reason} to --out "
        "as batches finish. Rerunning the same command resumes. Sampling defaults are POLAR's.",
    )
    add_model_arguments(gen, endpoints=True)
    gen.add_argument(
        "--prompts", required=True, metavar="FILE", help="prompt rows: JSONL, Parquet or a glob"
    )
    gen.add_argument("--out", required=True, metavar="FILE", help="JSONL of trajectory rows")
    gen.add_argument("--policy", help="the rows' policy name (default: MODEL's directory name)")
    gen.add_argument("--n", type=int, default=1, help="responses per prompt (default 1)")
    add_sampling_options(gen, POLAR_SAMPLING)
    gen.add_argument(
        "--upload-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="for a remote --out (gs://...): upload the rows finished since the last upload as "
        "a part OUT.parts/part-N.jsonl at most this often (default 30); a rerun goes on after "
        "the uploaded parts, and the finished run leaves OUT alone",
    )
    endpoint = gen.add_argument_group("when MODEL is an endpoint (see jaxrm/generate/endpoint.py)")
    endpoint.add_argument(
        "--endpoint-model", help="the served model's name (default: the one it lists)"
    )
    endpoint.add_argument(
        "--engine", choices=list(ENGINES), default="vllm", help="what serves it (default vllm)"
    )
    endpoint.add_argument("--api-key-env", metavar="VAR", help="send $VAR as the bearer token")
    endpoint.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight, at most (default 8)"
    )
    endpoint.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request (default 600)"
    )
    endpoint.add_argument(
        "--retries", type=int, default=6, help="retries of a failed request (default 6)"
    )
    storage.add_compile_cache_option(gen)
    add_distributed_options(gen)
    gen.set_defaults(run=cmd_generate)


def join_hosts(args: argparse.Namespace) -> None:
    """Joins the other processes of a multi-host generation (`add_distributed_options`)."""
    initialize(args.coordinator, args.num_processes, args.process_id)


def cmd_generate(args: argparse.Namespace) -> None:
    join_hosts(args)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    check_run_settings(args.seed, args.batch_size, "--")
    sampling = sampling_from(args)
    prompts = read_prompts(args.prompts)
    settings: dict[str, Any] = {
        "prompts": str(storage.absolute(args.prompts)),
        "n": args.n,
        "seed": args.seed,
        **dataclasses.asdict(sampling),
    }
    source: LocalPolicy | EndpointPolicy
    if is_endpoint(args.model):
        if args.overrides or args.tokenizer:
            raise UserError("key=value overrides and --tokenizer are for local models only")
        if not all(e.isdigit() for e in args.eos):
            raise UserError("--eos for an endpoint takes token ids (it has no tokenizer here)")
        endpoint = Endpoint(
            args.model,
            args.endpoint_model,
            args.engine,
            args.api_key_env,
            args.concurrency,
            args.timeout,
            args.retries,
            tuple(int(e) for e in args.eos),
        ).checked(None)
        policy_name = args.policy or endpoint.served_model(args.model)
        source = EndpointPolicy(endpoint, policy_name, sampling, args.seed, args.max_new_tokens)
        jobs = make_jobs(prompts, None, args.n, None)
        settings |= endpoint.settings(source.model)
    else:
        storage.use_compile_cache(args.compile_cache)
        model = open_model(args.model, args.overrides, args.tokenizer, args.eos)
        policy_name = args.policy or storage.name(storage.absolute(args.model))
        jobs = make_jobs(prompts, model.tokenizer, args.n, model.max_positions)
        sampler = model.sampler(sampling, args.seed, args.batch_size)
        source = LocalPolicy(model, sampler, args.max_new_tokens)
        settings |= {
            "model": str(storage.absolute(args.model)),
            "overrides": list(args.overrides),
            "eos_ids": model.eos_ids,
        }
    summary = generate_file(source, jobs, args.out, policy_name, settings, args.upload_every)
    print(json.dumps(summary))
