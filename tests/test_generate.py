"""`jaxrm generate`, `jaxrm data polar-pool` and `jaxrm data codepmp-generate` end to end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from data_helpers import child_xla_flags, hf_model, sentence, train_sentencepiece, write_jsonl

from jaxrm.cli import main
from jaxrm.data.tokenizer import load_tokenizer

pytest.importorskip("torch")
VOCAB = 320  # above the tokenizer's ~300 pieces, as padded vocabularies are


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random Llama and Qwen2 causal LMs with a SentencePiece tokenizer beside them."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_sentencepiece(root / "tokenizer").parent
    for arch in ("llama", "qwen2"):
        model = hf_model(arch, "ForCausalLM", scale=0.3, vocab_size=VOCAB, bos_token_id=1)
        model.generation_config.eos_token_id = 2
        model.save_pretrained(root / arch)
        for file in tokenizer.iterdir():
            shutil.copy(file, root / arch)
    return root


def prompt_file(path, count, seed=0):
    import random

    rng = random.Random(seed)
    rows = [{"prompt": sentence(rng, rng.randint(1, 12))} for _ in range(count)]
    rows[1] = {
        "prompt": [{"role": "user", "content": "the quick"}, {"role": "user", "content": "fox"}]
    }
    return write_jsonl(path, rows)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(model, prompts, out, *flags):
    args = ["generate", str(model), "model.dtype=float32", "--prompts", str(prompts)]
    return main([*args, "--out", str(out), "--max-new-tokens", "12", "--batch-size", "4", *flags])


def test_generate_writes_n_rows_per_prompt_in_order_from_hf_or_jaxrm_checkpoint(
    models, tmp_path, capsys
):
    prompts = prompt_file(tmp_path / "prompts.jsonl", 5)
    assert generate(models / "llama", prompts, tmp_path / "hf.jsonl", "--n", "2") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read(tmp_path / "hf.jsonl")
    given = [r["prompt"] for r in read(prompts)]
    assert [r["prompt"] for r in rows] == [p for p in given for _ in range(2)]
    assert {r["policy"] for r in rows} == {"llama"}
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert summary["rows"] == 10 and summary["stop"] + summary["length"] == 10
    assert rows[0]["response"] != rows[1]["response"]  # two samples of one prompt

    # The response is the text that continues the prompt: prompt + response re-encodes to the
    # prompt's tokens followed by the response's.
    tokenizer = load_tokenizer(models / "llama")
    plain = [r for r in rows if isinstance(r["prompt"], str) and r["response"]]
    for row in plain:
        whole = tokenizer.decode(tokenizer.encode(row["prompt"] + row["response"]))
        assert whole == row["prompt"] + row["response"]

    main(["import", str(models / "llama"), str(tmp_path / "ckpt"), "--keep-lm-head"])
    flags = ("--n", "2", "--policy", "llama")
    assert generate(tmp_path / "ckpt", prompts, tmp_path / "jaxrm.jsonl", *flags) == 0
    assert read(tmp_path / "jaxrm.jsonl") == rows


def test_generate_refuses_other_settings_foreign_files_and_models_without_lm_head(
    models, tmp_path, capsys
):
    prompts = prompt_file(tmp_path / "prompts.jsonl", 3)
    out = tmp_path / "out.jsonl"
    assert generate(models / "qwen2", prompts, out) == 0
    assert generate(models / "qwen2", prompts, out, "--temperature", "0.5") == 1
    assert "other settings (temperature: 1.0 -> 0.5)" in capsys.readouterr().err
    (tmp_path / "mine.jsonl").write_text("{}\n")
    assert generate(models / "qwen2", prompts, tmp_path / "mine.jsonl") == 1
    assert "was not written by jaxrm generate" in capsys.readouterr().err

    main(["import", str(models / "qwen2"), str(tmp_path / "rm")])  # a reward model: no LM head
    assert generate(tmp_path / "rm", prompts, tmp_path / "rm.jsonl") == 1
    assert "no LM head" in capsys.readouterr().err

    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x"}, {"prompt": "dog " * 300}])
    assert generate(models / "qwen2", long, tmp_path / "long_out.jsonl") == 1
    err = capsys.readouterr().err
    assert f"{long}:2: the prompt has" in err and len(err.strip().splitlines()) == 1
    for flag, value in (("--top-p", "0"), ("--top-k", "-1"), ("--temperature", "-1"), ("--n", "0")):
        assert generate(models / "qwen2", prompts, tmp_path / "bad.jsonl", flag, value) == 1
        assert flag in capsys.readouterr().err


@pytest.mark.slow
def test_killed_generation_resumes_to_the_uninterrupted_output(models, tmp_path):
    prompts = prompt_file(tmp_path / "prompts.jsonl", 40)
    whole, killed = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    args = ["generate", str(models / "llama"), "model.dtype=float32", "--prompts", str(prompts)]
    args += ["--out", str(killed), "--max-new-tokens", "12", "--batch-size", "4", "--policy", "p"]
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxrm", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )

    def kill_after_eight_rows():
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if killed.exists() and killed.read_text().count("\n") >= 8:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_eight_rows)
    watcher.start()
    try:  # the uninterrupted output, written meanwhile in this process
        assert generate(models / "llama", prompts, whole, "--policy", "p") == 0
    finally:
        watcher.join()
        process.wait()
    written = killed.read_text().count("\n")
    assert process.returncode == -signal.SIGKILL and 8 <= written < 40
    with open(killed, "a") as f:  # as if killed in the middle of writing a row
        f.write('{"prompt": "the quick bro')

    assert generate(models / "llama", prompts, killed, "--policy", "p") == 0
    assert killed.read_text() == whole.read_text()


@pytest.fixture(scope="module")
def pool_run(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    prompt_file(root / "prompts.jsonl", 8)
    (root / "pool.yaml").write_text(
        f"""
prompts: prompts.jsonl
out: triples.jsonl
work_dir: work
seed: 3
batch_size: 8
sampling: {{max_new_tokens: 8}}
policies:
  - {{name: llama, model: {models / "llama"}, overrides: [model.dtype=float32]}}
  - {{name: qwen2, model: {models / "qwen2"}}}
  - {{name: llama-cold, model: {models / "llama"}, sampling: {{temperature: 0.5}}}}
"""
    )
    assert main(["data", "polar-pool", str(root / "pool.yaml")]) == 0
    return root


def test_polar_pool_draws_two_samples_of_a_and_one_of_b_per_prompt(pool_run):
    triples = read(pool_run / "triples.jsonl")
    prompts = [r["prompt"] for r in read(pool_run / "prompts.jsonl")]
    assert [t["prompt"] for t in triples] == prompts
    work = pool_run / "work"
    samples = {}
    for policy in ("llama", "qwen2", "llama-cold"):
        for row in read(work / f"{policy}.jsonl"):
            key = json.dumps(row["prompt"])
            samples.setdefault(key, {}).setdefault(policy, []).append(row["response"])
    for triple in triples:
        by_policy = samples[json.dumps(triple["prompt"])]
        a, b = triple["chosen_policy"], triple["rejected_policy"]
        assert sorted(len(v) for v in by_policy.values()) == [1, 2] and a != b
        assert sorted([triple["reference"], triple["chosen"]]) == sorted(by_policy[a])
        assert [triple["rejected"]] == by_policy[b]
    # The same model under two names samples with different seeds.
    assert read(work / "llama.jsonl") != read(work / "llama-cold.jsonl")


def test_polar_pool_refuses_a_finished_output_and_bad_settings(pool_run, models, tmp_path, capsys):
    head = "prompts: p.jsonl\nout: o.jsonl\nwork_dir: w\n"
    llama = models / "llama"

    def pool(first, second=f"{{name: b, model: {llama}}}", settings=""):
        return f"{head}{settings}policies:\n  - {first}\n  - {second}"

    assert main(["data", "polar-pool", str(pool_run / "pool.yaml")]) == 1
    assert "already exists" in capsys.readouterr().err
    for text, message in (
        (f"{head}policies: []\nsampling: {{top_q: 1}}", "top_q"),
        (f"{head}policies: [{{name: a, model: m}}]", "two or more"),
        ("prompts: p.jsonl\nout: o.jsonl\npolicies: []", "'work_dir' is missing"),
        ("prompt: p.jsonl", "unknown key 'prompt'"),
        (pool("{name: a/b, model: m}"), "a/b"),
        (pool("{name: a, model: nowhere}"), "policies[0].model: checkpoint not found"),
        (
            pool(f"{{name: a, model: {llama}, sampling: {{top_p: 2}}}}"),
            "policies[0].sampling.top_p",
        ),
        (pool(f"{{name: a, model: {llama}, overrides: model.dtype=float32}}"), "overrides"),
        (pool(f"{{name: a, model: {llama}, template: 5}}"), "policies[0].template"),
        (pool(f"{{name: b, model: {llama}}}"), "must differ"),
        (pool(f"{{name: a, model: {llama}}}", settings="per_prompt: 0\n"), "per_prompt"),
        (pool(f"{{name: a, model: {llama}}}", settings="seed: -1\n"), "seed"),
    ):
        (tmp_path / "pool.yaml").write_text(text)
        assert main(["data", "polar-pool", str(tmp_path / "pool.yaml")]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_codepmp_generate_describes_sources_and_pairs_strong_with_weak(models, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for i in range(5):
        (code / f"f{i}.py").write_text(f"# adds {i}\ndef add(a, b):\n    return a + b + {i}\n")
    (code / "bare.py").write_text("def f():\n    return 1\n")  # no comment: filtered out
    (tmp_path / "codepmp.yaml").write_text(
        f"""
sources: ["code/*.py"]
out: pairs.jsonl
work_dir: work
describer: {{model: {models / "qwen2"}, sampling: {{max_new_tokens: 8}}}}
strong: {{model: {models / "llama"}, sampling: {{max_new_tokens: 8}}}}
weak: {{model: {models / "qwen2"}, sampling: {{max_new_tokens: 8}}}}
filters: {{min_comment_density: 0.05}}
"""
    )
    assert main(["data", "codepmp-generate", str(tmp_path / "codepmp.yaml")]) == 0
    work = tmp_path / "work"
    descriptions = read(work / "descriptions.jsonl")
    assert len(descriptions) == 5 and all(d["id"].endswith(".py") for d in descriptions)
    asked = read(work / "describer.jsonl")
    assert all("```python\n# adds" in r["prompt"] for r in asked)
    strong = {r["id"]: r["response"] for r in read(work / "strong.responses.jsonl")}
    weak = {r["id"]: r["response"] for r in read(work / "weak.responses.jsonl")}
    pairs = read(tmp_path / "pairs.jsonl")
    assert len(pairs) == 5
    for pair, description in zip(pairs, descriptions, strict=True):
        assert pair["prompt"] == description["prompt"]
        assert (pair["chosen"], pair["rejected"]) == (
            strong[description["id"]],
            weak[description["id"]],
        )


def test_resume_reads_rows_holding_unicode_line_separators(models, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the quick\u2028fox\x85dog"}] * 2)
    out = tmp_path / "out.jsonl"
    assert generate(models / "llama", prompts, out) == 0
    assert "\u2028" in out.read_text()
    capsys.readouterr()
    assert generate(models / "llama", prompts, out) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 2


def test_an_empty_output_restarts_with_new_settings_and_eos_text_is_not_made_special(
    models, tmp_path
):
    from jaxrm.generate.trajectories import open_model

    prompts = prompt_file(tmp_path / "prompts.jsonl", 2)
    out = tmp_path / "out.jsonl"
    out.write_text("")  # a first run that failed before writing a row
    (tmp_path / "out.jsonl.generate.json").write_text('{"max_new_tokens": 1000000}')
    assert generate(models / "llama", prompts, out) == 0 and len(read(out)) == 2

    plain = load_tokenizer(models / "llama")
    piece = plain.id_to_token(plain.encode("the dog")[-1])
    model = open_model(models / "llama", extra_eos=[piece, "7"])
    assert {plain.token_to_id(piece), 7} <= set(model.eos_ids)
    text = "the dog the fox"
    assert model.tokenizer.encode(text) == plain.encode(text)
    assert model.tokenizer.decode(plain.encode(text)) == text


def test_polar_triples_leaves_out_empty_responses_and_counts_them(tmp_path, capsys):
    rows = [
        {"prompt": "p", "policy": "a", "response": "one"},
        {"prompt": "p", "policy": "a", "response": "two"},
        {"prompt": "p", "policy": "a", "response": ""},
        {"prompt": "p", "policy": "b", "response": "three"},
    ]
    write_jsonl(tmp_path / "t.jsonl", rows)
    assert (
        main(["data", "polar-triples", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o")])
        == 0
    )
    assert "left out 1 empty responses" in capsys.readouterr().out
    (triple,) = read(tmp_path / "o")
    assert {triple["reference"], triple["chosen"]} == {"one", "two"}


def generate_on_hosts(model, prompts, out, port):
    """Two processes x 4 CPU devices joined on 127.0.0.1, each answering its share."""
    env = {**os.environ, "XLA_FLAGS": child_xla_flags(4)}
    args = ["generate", str(model), "model.dtype=float32", "--prompts", str(prompts)]
    args += ["--out", str(out), "--max-new-tokens", "12", "--batch-size", "4", "--n", "2"]
    args += ["--policy", "p", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jaxrm", *args, "--process-id", str(i)],
            env={**env, "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_two_hosts_generate_what_one_does_and_resume_their_own_parts(models, tmp_path):
    from test_multihost import free_port

    prompts = prompt_file(tmp_path / "prompts.jsonl", 12)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"

    # Killed once both hosts have written part of their share; rerun, each goes on from its own.
    hosts = generate_on_hosts(models / "llama", prompts, two, free_port())
    parts = [tmp_path / f"two.jsonl.host-0000{i}-of-00002" for i in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and all(h.poll() is None for h in hosts):
        if all(p.exists() and p.read_text().count("\n") >= 4 for p in parts):
            break
        time.sleep(0.02)
    for host in hosts:
        host.kill()
        host.wait()
    assert all(4 <= p.read_text().count("\n") < 12 for p in parts) and not two.exists()

    hosts = generate_on_hosts(models / "llama", prompts, two, free_port())
    # One process's output, written meanwhile (the hosts' processes are mostly one thread each).
    assert generate(models / "llama", prompts, one, "--n", "2", "--policy", "p") == 0
    summaries = []
    for host in hosts:
        output, _ = host.communicate(timeout=300)
        assert host.returncode == 0, output[-2000:]
        summaries.append(json.loads(output.strip().splitlines()[-1]))
    assert [s["resumed_from"] >= 4 for s in summaries] == [True, True]
    assert two.read_text() == one.read_text()
    assert (tmp_path / "two.jsonl.generate.json").read_text() == (
        tmp_path / "one.jsonl.generate.json"
    ).read_text()
    assert not any(p.exists() for p in parts)


@pytest.mark.slow
def test_two_hosts_generate_into_a_bucket(models, gcs, tmp_path):
    """The hosts of a slice share no disk: their parts and the merged file live in a bucket."""
    from test_multihost import free_port

    from jaxrm import storage

    prompts = prompt_file(tmp_path / "prompts.jsonl", 6)
    one = tmp_path / "one.jsonl"
    out = f"{gcs.create_bucket('generate')}/two.jsonl"
    hosts = generate_on_hosts(models / "llama", prompts, out, free_port())
    assert generate(models / "llama", prompts, one, "--n", "2", "--policy", "p") == 0  # meanwhile
    for host in hosts:
        output, _ = host.communicate(timeout=300)
        assert host.returncode == 0, output[-2000:]
    assert storage.read_text_file(out) == one.read_text()
    assert storage.list_names(storage.parent(out)) == ["two.jsonl", "two.jsonl.generate.json"]
