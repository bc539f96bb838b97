"""The KV-cache sampler: greedy equals transformers' generate; sampling follows top-k / top-p."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import hf_model
from flax import nnx

from jaxrm.config import load_config
from jaxrm.errors import UserError
from jaxrm.generate.sampler import Sampler, Sampling, restrict
from jaxrm.hf.convert import export_hf, load_hf
from jaxrm.model.decoder import Loaded, create_model
from jaxrm.sharding import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FP32 = ["model.dtype=float32"]
BOS = 1


def prompts(count, seed=0, lengths=(1, 40)):
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(4, 256, rng.integers(*lengths)).tolist()] for _ in range(count)]


def hf_greedy(model, prompt, max_new, eos):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=eos,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "internlm2"])
def test_greedy_generation_equals_transformers_generate(tmp_path, arch):
    """InternLM2 (remote code, not in transformers) is the Llama model written in POLAR's
    InternLM2 layout (fused grouped wqkv, `output` LM head) by jaxrm's exporter."""
    reference = hf_model("llama" if arch == "internlm2" else arch, "ForCausalLM", scale=0.5)
    reference.generation_config.bos_token_id = BOS
    reference.save_pretrained(tmp_path / "hf")
    model_dir = tmp_path / "hf"
    if arch == "internlm2":
        llama = load_hf(model_dir, keep_lm_head=True, overrides=FP32)
        model_dir = export_hf(llama, tmp_path / "internlm2", arch="internlm2", causal_lm=True)
        assert json.loads((model_dir / "config.json").read_text())["model_type"] == "internlm2"
    batch = prompts(11)
    # An EOS that greedy decoding meets a few tokens into the first prompt's answer, so rows of
    # one batch stop at different steps.
    eos = hf_greedy(reference, batch[0], 6, eos=-1)[5]
    want = [hf_greedy(reference, p, 24, eos) for p in batch]
    assert any(w[-1] == eos for w in want) and any(len(w) == 24 for w in want)

    loaded = load_hf(model_dir, keep_lm_head=True, overrides=FP32)
    sampler = Sampler(loaded, make_mesh(fsdp=-1), Sampling(temperature=0), batch_size=8)
    got = sampler.generate(batch, [(i, 0) for i in range(len(batch))], 24, [eos])
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.tokens == w, f"prompt {i}"
        assert g.finish == ("stop" if w[-1] == eos else "length")


def constant_model(target_logits, lm_head=True):
    """A jaxrm LM whose next-token logits are `target_logits` whatever the context: the layers
    add nothing (zero output projections), every token embeds to ones, and the final norm of
    ones is ones, so the logits are the first row of the LM head."""
    vocab = len(target_logits)
    config = load_config(
        None,
        [
            *FP32,
            f"model.vocab_size={vocab}",
            f"model.lm_head={str(lm_head).lower()}",
            "model.rms_norm_eps=1e-12",
            "model.max_position_embeddings=64",
        ],
    )
    model = create_model(config.model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["layers"]["attention"]["wo"] = jnp.zeros_like(params["layers"]["attention"]["wo"])
    params["layers"]["mlp"]["down"] = jnp.zeros_like(params["layers"]["mlp"]["down"])
    params["embed"] = jnp.ones_like(params["embed"])
    if lm_head:
        head = jnp.zeros_like(params["lm_head"]).at[0].set(jnp.asarray(target_logits))
        params["lm_head"] = head
    nnx.update(model, params)
    return Loaded(model, config, None)


LOGITS = np.log(np.array([0.35, 0.25, 0.15, 0.1, 0.06, 0.05, 0.03, 0.01]))


def expected(logits, sampling):
    """The distribution top-k / top-p define, written out from their definitions."""
    probs = np.exp(logits / sampling.temperature)
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros(len(probs), bool)
    keep[order[: sampling.top_k or len(probs)]] = True
    if sampling.top_p < 1:
        kept = probs * keep / (probs * keep).sum()
        mass_before = np.cumsum(kept[order]) - kept[order]
        keep[order[mass_before >= sampling.top_p]] = False
    out = probs * keep
    return out / out.sum()


@pytest.mark.parametrize(
    "sampling, support",
    [
        (Sampling(1.0, 0, 1.0), 8),
        (Sampling(1.0, 3, 1.0), 3),
        (Sampling(1.0, 0, 0.7), 3),  # 0.35 + 0.25 < 0.7 <= 0.35 + 0.25 + 0.15
        (Sampling(1.0, 2, 0.9), 2),
        (Sampling(0.5, 5, 0.8), 2),  # sharper: 0.53 + 0.27 reaches 0.8
        (Sampling(2.0, 0, 0.6), 4),  # flatter: four tokens to reach 0.6
    ],
)
def test_sampling_draws_from_the_top_k_top_p_distribution(sampling, support):
    want = expected(LOGITS, sampling)
    assert np.count_nonzero(want) == support
    sampler = Sampler(constant_model(LOGITS), make_mesh(fsdp=-1), sampling, seed=3, batch_size=64)
    rows, new = 64, 48
    got = sampler.generate([[0]] * rows, [(i, 0) for i in range(rows)], new, eos_ids=[])
    tokens = np.array([g.tokens for g in got]).ravel()
    frequency = np.bincount(tokens, minlength=len(LOGITS)) / tokens.size
    assert set(np.flatnonzero(frequency)) == set(np.flatnonzero(want))
    # 3072 draws: a standard error below 0.009 per token; 0.035 is about 4 of them.
    np.testing.assert_allclose(frequency, want, atol=0.035)


def test_restrict_matches_transformers_logits_warpers():
    scores = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [(1.0, 50, 0.9), (0.7, 0, 0.5), (1.3, 10, 1.0)]:
        warpers = transformers.LogitsProcessorList(
            [transformers.TemperatureLogitsWarper(temperature)]
            + ([transformers.TopKLogitsWarper(top_k)] if top_k else [])
            + ([transformers.TopPLogitsWarper(top_p)] if top_p < 1 else [])
        )
        want = warpers(None, scores.clone()).numpy()
        got = np.asarray(restrict(jnp.asarray(scores.numpy()), Sampling(temperature, top_k, top_p)))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        finite = ~np.isinf(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6)


def test_samples_depend_on_seed_prompt_and_sample_index_only(tmp_path):
    hf_model("llama", "ForCausalLM", scale=0.5).save_pretrained(tmp_path)
    mesh, one_device = make_mesh(fsdp=-1), make_mesh(fsdp=1, devices=jax.devices()[:1])
    sampling = Sampling(1.0, 50, 0.9)
    batch = prompts(6, seed=1)
    ids = [(i // 2, i % 2) for i in range(6)]

    def run(seed, size, order, mesh=mesh):
        loaded = load_hf(tmp_path, mesh=mesh, keep_lm_head=True, overrides=FP32)
        sampler = Sampler(loaded, mesh, sampling, seed, size)
        return sampler.generate([batch[i] for i in order], [ids[i] for i in order], 16, [2])

    first = [g.tokens for g in run(0, 8, range(6))]
    assert first == [g.tokens for g in run(0, 8, range(6))]
    # Two rows at a time (refilled as they finish) and another order: each sample keeps its tokens.
    reordered = run(0, 2, [5, 3, 1, 0, 2, 4], one_device)
    assert [g.tokens for g in reordered] == [first[i] for i in [5, 3, 1, 0, 2, 4]]
    assert first[0] != first[1]  # two samples of one prompt differ
    assert first != [g.tokens for g in run(1, 8, range(6))]


def test_generation_stops_at_the_models_context_and_needs_an_lm_head():
    sampler = Sampler(constant_model(LOGITS), make_mesh(fsdp=-1), Sampling(0.0))
    (done,) = sampler.generate([[0] * 60], [(0, 0)], 10, eos_ids=[])
    assert done.finish == "length" and len(done.tokens) == 4  # 64 positions
    with pytest.raises(UserError, match="no LM head"):
        Sampler(constant_model(LOGITS, lm_head=False), make_mesh(fsdp=-1), Sampling(0.0))


def test_generation_compiles_for_a_tpu_slice_with_splash_prefill():
    pytest.importorskip("libtpu", reason="TPU compiles need libtpu (the test extra pins it)")
    from jaxrm.model.decoder import abstract_model
    from jaxrm.sharding import activation_sharding, batch_sharding
    from jaxrm.tpu.compile_check import libtpu_warnings_hidden, parse_topology, topology_devices

    with libtpu_warnings_hidden():
        mesh = make_mesh(fsdp=-1, devices=topology_devices(parse_topology("v5p-8")))
        config = load_config(None, ["model.lm_head=true", "model.attention=splash"])
        graphdef, params = abstract_model(config.model, mesh, config.mesh.rules)
        loaded = Loaded(nnx.merge(graphdef, params), config, None)
        sampler = Sampler(loaded, mesh, Sampling(1.0, 50, 0.9), batch_size=16)
        rows_n, width, new = 16, 256, 512

        def batch(*shape):
            sharding = batch_sharding(mesh, config.mesh.rules, shape)
            return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)

        def first_chunk(state, tokens, lengths, budgets):
            rows = sampler._empty_rows(width + new, new)
            settings = {k: v for k, v in sampler._settings_of(rows_n).items()}
            prompts = {"where": jnp.arange(rows_n), "tokens": tokens, "length": lengths}
            prompts |= {"budget": budgets, **settings, "temperature": jnp.ones(rows_n)}
            rows = sampler._insert(state, rows, prompts, (64, 64))
            return sampler._decode(state, rows, sampler.DECODE_CHUNK, (64, 64))

        with activation_sharding(mesh, config.mesh.rules):
            compiled = (
                jax.jit(first_chunk)
                .lower(sampler.state, batch(rows_n, width), batch(rows_n), batch(rows_n))
                .compile()
            )
    model = config.model
    cache = 2 * model.num_layers * rows_n * (width + new) * model.num_kv_heads * model.head_dim * 2
    assert compiled.memory_analysis().temp_size_in_bytes >= cache / len(mesh.devices.flat)


def test_a_rows_draw_does_not_depend_on_the_plan_its_neighbours_make():
    """The same rows drawn with the narrowest plan their settings allow, and with plans their
    neighbours could force (a wider rank, the whole vocabulary): the same tokens."""
    from jaxrm.generate.sampler import choose, draw_plan

    rows, vocab = 64, 300
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 3, jnp.float32)
    settings = [
        Sampling(float(rng.uniform(0.5, 1.5)), int(rng.integers(1, 50)), float(rng.uniform(0.3, 1)))
        for _ in range(rows)
    ]
    keys = jax.vmap(jax.random.key)(jnp.arange(rows, dtype=jnp.uint32))
    args = [
        jnp.asarray([getattr(s, f) for s in settings]) for f in ("temperature", "top_k", "top_p")
    ]
    narrow = draw_plan(settings, vocab)
    assert narrow == (64, 64)
    drawn = [
        np.asarray(choose(logits, keys, *args, plan))
        for plan in (narrow, (128, vocab), (vocab, vocab))
    ]
    np.testing.assert_array_equal(drawn[0], drawn[1])
    np.testing.assert_array_equal(drawn[0], drawn[2])
    assert len(set(drawn[0].tolist())) > 10  # draws, not one token
