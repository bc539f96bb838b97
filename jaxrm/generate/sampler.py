"""Sampling from a causal LM with a KV cache and continuous batching.

    sampler = Sampler(loaded, mesh, Sampling(temperature=1.0, top_p=0.9, top_k=50), seed=0)
    done = sampler.generate(prompts, sample_ids, max_new_tokens=256, eos_ids={2})
    done[i].tokens, done[i].finish                 # ids up to and with EOS; "stop" | "length"
    for finished in sampler.run(feed, cache_length, max_new_tokens): ...  # requests as they come

`batch_size` rows share one KV cache. Waiting prompts are prefilled into free rows in one pass
(the model's own attention over the padded prompts); then every row decodes one token per step
inside a `lax.while_loop` of up to `DECODE_CHUNK` steps. Between chunks the host takes out the
rows that met a stop id or their token budget and refills them, so one long answer does not
hold the others up; `run` takes the new requests from a `Feed` there (`jaxrm serve-lm` feeds
HTTP requests). Every row has its own sampling settings, stop ids and seed; a row's randomness
comes from its seed and step alone (`generate` seeds sample j of prompt i with
`sample_seed(seed, i, j)`), and its draw is over the whole vocabulary whatever its neighbours
use, so a sample does not depend on the rows it ran beside: in float32 a resumed run writes
what an uninterrupted one would, and a served sample equals the local one (tested). In bfloat16
another prompt-width bucket or prefill batch can change a logit's last bits, and with them,
rarely, a draw.

Logits are processed as transformers' `generate` does: temperature, then top-k, then top-p
(the smallest set of most likely tokens whose probability reaches p), then a draw; temperature
0 is greedy (argmax).
"""

import collections
import dataclasses
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrm.data.packing import round_up
from jaxrm.errors import UserError
from jaxrm.model.attention import attention
from jaxrm.model.decoder import Loaded, RewardModel
from jaxrm.sharding import activation_sharding, batch_sharding, constrain

Array = jax.Array
CACHE_AXES = ("batch", None, "act_kv_heads", None)
ROW_SETTINGS = ("seed", "temperature", "top_k", "top_p", "stops")
MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion to make: prompt token ids (BOS included), its budget, its own random
    stream (`seed`, e.g. from `sample_seed`), how to draw, and stop ids besides none."""

    ids: Sequence[int]
    max_new_tokens: int
    seed: int
    sampling: Sampling
    stop_ids: tuple[int, ...] = ()
    watch: bool = False  # the feed's `cut` looks at this row's tokens after every chunk


@dataclasses.dataclass
class Generated:
    tokens: list[int]  # the new tokens, the final stop id included when there is one
    finish: str  # "stop" (a stop id or the feed's cut) or "length" (budget or the context)


class Feed(Protocol):
    """Where `Sampler.run` takes its requests from, between decode chunks."""

    def take(self, free: int, wait: bool) -> list[tuple[Any, Request]] | None:
        """Up to `free` new (key, request) pairs; `wait`: nothing is running, so block until
        there is one. None: there will be no more."""
        ...

    def cut(self, key: Any, tokens: list[int]) -> int | None:
        """For a `watch`ed row: how many of its tokens so far to keep when it should end now
        (a stop text was written), else None."""
        ...


def sample_seed(seed: int, prompt_index: int, sample: int) -> int:
    """A sample's own 31-bit seed from (run seed, prompt index, sample index): what jaxrm's
    sampler draws with, and what an endpoint is sent, so both can make the same sample."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def draw_plan(samplings: Iterable[Sampling], vocab: int) -> tuple[int, int]:
    """The static shape of the rows' draws, (rank, draw): the `rank` best logits hold every
    row's top-k / top-p support (0: no row restricts; the whole vocabulary, a sort, once a row
    uses top-p without top-k), and the draw is among the `draw` best (when every row has a
    top-k) or the whole vocabulary. (-1, 0): every row is greedy."""
    drawn = [s for s in samplings if s.temperature > 0]
    if not drawn:
        return -1, 0
    widest = max(s.top_k for s in drawn)
    rank = 0 if widest == 0 else min(vocab, 2 ** math.ceil(math.log2(widest)))
    if any(s.top_k == 0 and s.top_p < 1 for s in drawn):
        rank = vocab
    return rank, rank if all(s.top_k > 0 for s in drawn) else vocab


def restricted(
    logits: Array, temperature: Array, top_k: Array, top_p: Array, rank: int
) -> tuple[Array, Array | None, Array | None]:
    """[rows, vocab] logits after each row's temperature, with -inf outside its top-k / top-p
    support (the smallest set of most likely tokens whose probability reaches p, within the top
    k, as transformers' warpers do), found among the `rank` best; and those `rank` best, masked
    alike, with their ids (None when `rank` is 0: no row restricts)."""
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if rank <= 0:
        return scaled, None, None
    ranked, ids = jax.lax.top_k(scaled, rank)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, rank), rank)
    ranked = jnp.where(jnp.arange(rank)[None, :] < k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    ranked = jnp.where((top_p[:, None] >= 1) | (mass_before < top_p[:, None]), ranked, -jnp.inf)
    floor = jnp.where(jnp.isfinite(ranked), ranked, jnp.inf).min(axis=-1)
    floor = jnp.where((top_k > 0) | (top_p < 1), floor, -jnp.inf)
    return jnp.where(scaled >= floor[:, None], scaled, -jnp.inf), ranked, ids


def restrict(logits: Array, sampling: Sampling) -> Array:
    """`restricted` with one sampling for every row."""
    rows, vocab = logits.shape
    full = lambda value, dtype: jnp.full(rows, value, dtype)  # noqa: E731
    rank, _ = draw_plan([dataclasses.replace(sampling, temperature=1.0)], vocab)
    return restricted(
        logits,
        full(sampling.temperature or 1.0, jnp.float32),
        full(sampling.top_k, jnp.int32),
        full(sampling.top_p, jnp.float32),
        rank,
    )[0]


def token_noise(keys: Array, ids: Array) -> Array:
    """Gumbel noise [rows, n] for token `ids` [rows, n], a function of (row key, token id) alone:
    the draw is the argmax of logit + noise over the support (Gumbel-max), so it is the same
    whichever candidates a plan looks at, and only the candidates' noise is made. The key's bits
    and the id go through two rounds of MurmurHash3's 32-bit finaliser (a fast mix, not a
    cryptographic one; the keys themselves come from threefry)."""
    bits = jax.random.key_data(keys)
    low, high = bits[..., 0][:, None], bits[..., -1][:, None]
    mixed = _fmix32(_fmix32(ids.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) ^ low) ^ high)
    uniform = ((mixed >> 8).astype(jnp.float32) + 0.5) * 2.0**-24  # in (0, 1)
    return -jnp.log(-jnp.log(uniform))


def _fmix32(x: Array) -> Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def choose(
    logits: Array,
    keys: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
    plan: tuple[int, int],
) -> Array:
    """One token per row: argmax for greedy rows, else a draw from the row's restricted
    distribution. A row's draw never depends on its neighbours' settings: they change the
    `plan` (`draw_plan`), which only decides which candidates get noise."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    rank, draw = plan
    if rank < 0:
        return best
    support, ranked, ids = restricted(logits, temperature, top_k, top_p, rank)
    if draw == rank and ranked is not None and ids is not None:  # among the ranked ones
        values, candidates = ranked, ids
    else:
        values = support
        candidates = jnp.broadcast_to(jnp.arange(logits.shape[-1]), logits.shape)
    pick = jnp.argmax(values + token_noise(keys, candidates), axis=-1)
    drawn = jnp.take_along_axis(candidates, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, best)


def cached_attention(
    q: Array, k_new: Array, v_new: Array, k_cache: Array, v_cache: Array, position: Array
) -> Array:
    """One new token per row attending to its cached keys before `position` and to itself.

    q [rows, 1, heads, dim]; k_new, v_new [rows, 1, kv_heads, dim]; caches [rows, length,
    kv_heads, dim]. The new key is scored apart from the cache, so the cache is only read here.
    """
    rows, _, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim)
    scale = 1.0 / math.sqrt(dim)
    f32 = jnp.float32
    cached = jnp.einsum("bkgd,btkd->bkgt", grouped, k_cache, preferred_element_type=f32) * scale
    valid = jnp.arange(k_cache.shape[1])[None, :] < position[:, None]
    cached = jnp.where(valid[:, None, None, :], cached, -jnp.inf)
    own = jnp.einsum("bkgd,bkd->bkg", grouped, k_new[:, 0], preferred_element_type=f32) * scale
    top = jnp.maximum(cached.max(axis=-1), own)
    cached_weights = jnp.exp(cached - top[..., None])
    own_weight = jnp.exp(own - top)
    total = cached_weights.sum(axis=-1) + own_weight
    mixed = jnp.einsum(
        "bkgt,btkd->bkgd", cached_weights.astype(v_cache.dtype), v_cache, preferred_element_type=f32
    )
    mixed = mixed + own_weight[..., None] * v_new[:, 0, :, None, :].astype(f32)
    out = (mixed / total[..., None]).astype(q.dtype)
    return out.reshape(rows, 1, heads, dim)


def prefill(model: RewardModel, tokens: Array, lengths: Array) -> tuple:
    """Runs the padded prompts [rows, width]; returns (next-token logits [rows, vocab], their
    keys and values (k, v), each [layers, rows, width, kv_heads, dim])."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)

    def attend(q: Array, k: Array, v: Array, _: None) -> tuple[Array, tuple[Array, Array]]:
        out = attention(q, k, v, segment_ids, None, model.attention)
        return out, (constrain(k, CACHE_AXES), constrain(v, CACHE_AXES))

    x = model.embed_tokens(tokens)
    hidden, cache = model.run_layers(x, positions, attend, position_limit=tokens.shape[1])
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return model.lm_logits(last)[:, 0], cache


def decode_step(
    model: RewardModel, token: Array, position: Array, cache: tuple[Array, Array]
) -> tuple[Array, tuple[Array, Array]]:
    """Feeds one token per row at `position`; returns (next-token logits, cache with it)."""

    def attend(q: Array, k: Array, v: Array, layer_cache: tuple) -> tuple[Array, tuple]:
        return cached_attention(q, k, v, *layer_cache, position), (k[:, 0], v[:, 0])

    hidden, new = model.run_layers(
        model.embed_tokens(token[:, None]), position[:, None], attend, cache
    )
    cache = tuple(_write_at(c, x, position) for c, x in zip(cache, new, strict=True))
    return model.lm_logits(hidden)[:, 0], cache


def _write_at(cache: Array, new: Array, position: Array) -> Array:
    """cache [layers, rows, length, ...] with new [layers, rows, ...] at each row's position."""

    def one_row(row_cache: Array, entry: Array, at: Array) -> Array:
        return jax.lax.dynamic_update_slice_in_dim(row_cache, entry[None], at, axis=0)

    return jax.vmap(jax.vmap(one_row), (0, 0, None))(cache, new, position)


def _bucket(n: int, multiple: int, limit: int) -> int:
    """`n` rows rounded up to `multiple` times a power of two, at most `limit`: few shapes."""
    blocks = -(-n // multiple)
    return min(limit, multiple * 2 ** math.ceil(math.log2(blocks)))


class Sampler:
    """A loaded causal LM on `mesh` that completes token prompts with continuous batching.

    `batch_size` rows decode together. The decode loop runs on the device `DECODE_CHUNK` steps at
    a time; between chunks the host collects the rows that met a stop id or their budget and
    prefills waiting prompts into their rows, so a long answer does not hold up the others. Each
    row carries its own sampling settings, seed and stop ids (`Request`); `sampling` and `seed`
    are what `generate` and `completions` use for all of theirs.
    """

    DECODE_CHUNK = 32
    STOP_SLOTS = 16

    def __init__(
        self,
        loaded: Loaded,
        mesh: Mesh,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        batch_size: int = 32,
        vocab_limit: int | None = None,
    ):
        if not loaded.config.model.lm_head:
            raise UserError(
                "this checkpoint has no LM head to generate with (a reward model trained without "
                "model.lm_head); give a causal LM: a Hugging Face directory or a CodePMP checkpoint"
            )
        self.config = loaded.config.model
        self.mesh, self.rules = mesh, loaded.config.mesh.rules
        self.sampling, self.seed = sampling, seed
        self.vocab_limit = vocab_limit
        self.row_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-max(batch_size, 1) // self.row_multiple) * self.row_multiple
        self.graphdef, self.state = nnx.split(loaded.model)
        self.empty_rows = jax.jit(self._empty_rows, static_argnums=(0, 1))
        self.insert = jax.jit(self._insert, static_argnums=(3,), donate_argnums=(1,))
        self.decode = jax.jit(self._decode, static_argnums=(2, 3), donate_argnums=(1,))
        self.end = jax.jit(self._end, donate_argnums=(0,))

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def _next_token(
        self, logits: Array, rows: dict[str, Any], steps: Array, plan: tuple[int, int]
    ) -> Array:
        """Each row's token number `steps`, drawn with the row's own seed and settings."""
        if self.vocab_limit is not None:  # ids past the tokenizer's (padded vocabularies)
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(
            rows["seed"], steps
        )
        return choose(logits, keys, rows["temperature"], rows["top_k"], rows["top_p"], plan)

    def _empty_rows(self, length: int, max_new: int) -> dict[str, Any]:
        """Every row done, with a zero KV cache of `length` positions."""
        c = self.config
        rows = self.batch_size
        shape = (c.num_layers, rows, length, c.num_kv_heads, c.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(c.dtype))
        cache = tuple(constrain(zeros, (None, *CACHE_AXES)) for _ in range(2))
        ints = lambda: jnp.zeros(rows, jnp.int32)  # noqa: E731
        return {
            "cache": cache,
            "token": ints(),
            "length": ints(),
            "count": ints(),
            "budget": ints(),
            "done": jnp.ones(rows, bool),
            "out": jnp.zeros((rows, max_new), jnp.int32),
            **self._settings_of(rows),
        }

    def _settings_of(self, rows: int) -> dict[str, Any]:
        return {
            "seed": jnp.zeros(rows, jnp.uint32),
            "temperature": jnp.zeros(rows, jnp.float32),
            "top_k": jnp.zeros(rows, jnp.int32),
            "top_p": jnp.ones(rows, jnp.float32),
            "stops": jnp.full((rows, self.STOP_SLOTS), -1, jnp.int32),
        }

    def _insert(
        self,
        state: Any,
        rows: dict[str, Any],
        new: dict[str, Array],
        plan: tuple[int, int],
    ) -> dict[str, Any]:
        """Prefills prompts `new["tokens"]` [m, prompt width] into rows `new["where"]` (an index
        past the last row: none), with their budgets and settings."""
        model = nnx.merge(self.graphdef, state)
        tokens, lengths, where = new["tokens"], new["length"], new["where"]
        logits, new_cache = prefill(model, tokens, lengths)
        first = self._next_token(logits, new, jnp.zeros_like(lengths), plan)
        put = lambda x, value: x.at[where].set(value, mode="drop")  # noqa: E731
        settings = {key: put(rows[key], new[key]) for key in ROW_SETTINGS}
        return {
            "cache": tuple(
                c.at[:, where, : tokens.shape[1]].set(n, mode="drop")
                for c, n in zip(rows["cache"], new_cache, strict=True)
            ),
            "token": put(rows["token"], first),
            "length": put(rows["length"], lengths),
            "count": put(rows["count"], 0),
            "budget": put(rows["budget"], new["budget"]),
            "done": put(rows["done"], new["budget"] <= 0),
            "out": put(rows["out"], 0),
            **settings,
        }

    def _decode(
        self, state: Any, rows: dict[str, Any], steps: int, plan: tuple[int, int]
    ) -> dict[str, Any]:
        """Up to `steps` tokens for every unfinished row (fewer once all are done)."""
        model = nnx.merge(self.graphdef, state)
        every = jnp.arange(self.batch_size)

        def one_token(carry: tuple[Array, dict]) -> tuple[Array, dict]:
            step, r = carry
            live = ~r["done"]
            max_new = r["out"].shape[1]
            out = (
                r["out"]
                .at[every, jnp.where(live, r["count"], max_new)]
                .set(r["token"], mode="drop")
            )
            count = r["count"] + live
            stopped = (r["token"][:, None] == r["stops"]).any(axis=-1)
            done = r["done"] | (live & (stopped | (count >= r["budget"])))
            logits, cache = decode_step(model, r["token"], r["length"] + count - 1, r["cache"])
            token = jnp.where(done, r["token"], self._next_token(logits, r, count, plan))
            return step + 1, {
                **r,
                "cache": cache,
                "out": out,
                "count": count,
                "done": done,
                "token": token,
            }

        def unfinished(carry: tuple[Array, dict]) -> Array:
            step, r = carry
            return (step < steps) & ~jnp.all(r["done"])

        return jax.lax.while_loop(unfinished, one_token, (jnp.int32(0), rows))[1]

    def _end(self, rows: dict[str, Any], ended: Array) -> dict[str, Any]:
        """Rows `ended` [rows] bool marked done, with the tokens they have."""
        return {**rows, "done": rows["done"] | ended}

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sample_ids: Sequence[tuple[int, int]],
        max_new_tokens: int,
        eos_ids: Sequence[int],
    ) -> list[Generated]:
        """Completes each prompt (token ids, BOS included) once; `sample_ids[i]` is its (prompt
        index, sample index), which with the seed alone fixes its randomness (`sample_seed`)."""
        done: dict[int, Generated] = {}
        for finished in self.completions(prompts, sample_ids, max_new_tokens, eos_ids):
            done.update(finished)
        return [done[i] for i in range(len(prompts))]

    def completions(
        self,
        prompts: Sequence[Sequence[int]],
        sample_ids: Sequence[tuple[int, int]],
        max_new_tokens: int,
        eos_ids: Sequence[int],
    ) -> Iterator[list[tuple[int, Generated]]]:
        """Like `generate`, yielding (prompt number, completion) as rows finish, a list per
        decode chunk."""
        if not prompts:
            return
        # No row goes past the model's context: neither need the cache and the output buffer.
        max_new_tokens = max(1, min(max_new_tokens, self.max_positions - min(map(len, prompts))))
        width = round_up(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
        cache_length = max(width, min(width + max_new_tokens, self.max_positions))
        stops = tuple(sorted(set(eos_ids)))
        requests = [
            Request(p, max_new_tokens, sample_seed(self.seed, *ids), self.sampling, stops)
            for p, ids in zip(prompts, sample_ids, strict=True)
        ]
        yield from self.run(_Queue(requests), cache_length, max_new_tokens, width)

    def run(
        self, feed: Feed, cache_length: int, max_new_tokens: int, width: int | None = None
    ) -> Iterator[list[tuple[Any, Generated]]]:
        """Completes what `feed` gives, in rows of a KV cache of `cache_length` positions,
        yielding (key, completion) as rows finish, a list per decode chunk, until the feed has
        no more. Prompts are padded to `width`, or to a power-of-two bucket of each prefill's
        longest; no answer grows past `max_new_tokens`."""
        free = collections.deque(range(self.batch_size))
        running: dict[int, tuple[Any, Request]] = {}  # row -> what it answers
        vocab = self.vocab_limit or self.config.vocab_size
        with activation_sharding(self.mesh, self.rules):
            rows = self.empty_rows(cache_length, max_new_tokens)
            while True:
                taken = feed.take(len(free), not running) if free else []
                if taken is None and not running:
                    return
                if taken:
                    placed = [(free.popleft(), item) for item in taken]
                    rows = self._fill(rows, placed, width, cache_length, max_new_tokens, vocab)
                    running.update(placed)
                if not running:
                    continue
                settings = [request.sampling for _, request in running.values()]
                rows = self.decode(self.state, rows, self.DECODE_CHUNK, draw_plan(settings, vocab))
                finished, rows = self._collect(rows, running, feed)
                free.extend(row for row, _ in finished)
                if finished:
                    yield [result for _, result in finished]

    def _collect(
        self, rows: dict[str, Any], running: dict[int, tuple[Any, Request]], feed: Feed
    ) -> tuple[list[tuple[int, tuple[Any, Generated]]], dict[str, Any]]:
        """The rows that finished (met a stop id, their budget, or the feed's cut), taken out
        of `running`, with their completions."""
        done = np.asarray(rows["done"])
        watched = [row for row, (_, request) in running.items() if request.watch and not done[row]]
        ended = [row for row in running if done[row]]
        if not ended and not watched:
            return [], rows
        out, counts = np.asarray(rows["out"]), np.asarray(rows["count"])
        finished = []
        for row in ended:
            key, request = running.pop(row)
            new = out[row, : counts[row]].tolist()
            stop = "stop" if new and new[-1] in request.stop_ids else "length"
            finished.append((row, (key, Generated(new, stop))))
        cut = np.zeros(self.batch_size, bool)
        for row in watched:
            key, _ = running[row]
            keep = feed.cut(key, out[row, : counts[row]].tolist())
            if keep is not None:
                del running[row]
                cut[row] = True
                finished.append((row, (key, Generated(out[row, :keep].tolist(), "stop"))))
        if cut.any():
            rows = self.end(rows, jnp.asarray(cut))
        return finished, rows

    def _fill(
        self,
        rows: dict[str, Any],
        placed: list[tuple[int, tuple[Any, Request]]],
        width: int | None,
        cache_length: int,
        max_new_tokens: int,
        vocab: int,
    ) -> dict[str, Any]:
        requests = [request for _, (_, request) in placed]
        longest = max(len(r.ids) for r in requests)
        width = width or _bucket(longest, MIN_PROMPT_BUCKET, cache_length)
        count = _bucket(len(placed), self.row_multiple, self.batch_size)
        new = {
            "where": np.full(count, self.batch_size, np.int32),  # past the last row: dropped
            "tokens": np.zeros((count, width), np.int32),
            "length": np.ones(count, np.int32),
            "budget": np.zeros(count, np.int32),
            **{k: np.array(v) for k, v in self._settings_of(count).items()},
        }
        for i, (row, (_, request)) in enumerate(placed):
            prompt, stops = request.ids, request.stop_ids
            if len(stops) > self.STOP_SLOTS:
                raise UserError(f"at most {self.STOP_SLOTS} stop ids, got {len(stops)}")
            new["where"][i], new["tokens"][i, : len(prompt)], new["length"][i] = (
                row,
                prompt,
                len(prompt),
            )
            room = max(0, min(self.max_positions, cache_length) - len(prompt))
            new["budget"][i] = min(request.max_new_tokens, max_new_tokens, room)
            new["seed"][i] = request.seed
            new["temperature"][i] = request.sampling.temperature
            new["top_k"][i] = request.sampling.top_k
            new["top_p"][i] = request.sampling.top_p
            new["stops"][i, : len(stops)] = stops
        put = lambda x: jax.device_put(x, batch_sharding(self.mesh, self.rules, x.shape))  # noqa: E731
        plan = draw_plan([r.sampling for r in requests], vocab)
        return self.insert(self.state, rows, {k: put(v) for k, v in new.items()}, plan)


class _Queue:
    """A fixed list of requests as a `Feed`: keyed by their place in it."""

    def __init__(self, requests: Sequence[Request]):
        self.waiting = collections.deque(enumerate(requests))

    def take(self, free: int, wait: bool) -> list[tuple[Any, Request]] | None:
        if not self.waiting:
            return None
        return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]

    def cut(self, key: Any, tokens: list[int]) -> int | None:
        return None
