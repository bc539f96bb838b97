"""The dataset builders: POLAR triples, CodePMP pairs, comment density and their commands."""

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from jaxrm.data import codepmp_pairs as codepmp_module
from jaxrm.data import polar_triples as polar_module
from jaxrm.data.code_text import code_blocks, comment_density
from jaxrm.data.codepmp_pairs import codepmp_pairs
from jaxrm.data.polar_triples import polar_triples
from jaxrm.data.sources import open_source
from jaxrm.errors import UserError
from jaxrm.storage import write_jsonl

POLICIES = ("alpha", "beta", "gamma", "delta")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def trajectories(prompts: int, samples: int = 2, policies: tuple[str, ...] = POLICIES) -> list:
    """Rows whose response text says where it came from: 'prompt|policy|sample'."""
    return [
        {"prompt": f"p{p}", "policy": policy, "response": f"p{p}|{policy}|{k}"}
        for p in range(prompts)
        for policy in policies
        for k in range(samples)
    ]


def read_trajectories(spec: str | list[str]) -> list[tuple[str, dict]]:
    source = open_source(spec)
    return [source.read(i) for i in range(len(source))]


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="cmd", required=True)
    for module in (polar_module, codepmp_module):
        module.add_command(commands)
    args = parser.parse_args(argv)
    args.run(args)


# ----------------------------------------------------------------------------- POLAR


def test_every_triple_follows_the_polar_rule(tmp_path):
    rows = trajectories(30, samples=3)
    write_rows(tmp_path / "a.jsonl", rows[:200])
    write_rows(tmp_path / "b.jsonl", rows[200:])
    triples = polar_triples(read_trajectories(str(tmp_path / "*.jsonl")), seed=0, per_prompt=3)

    assert len(triples) == 90
    assert [t["prompt"] for t in triples] == [f"p{p}" for p in range(30) for _ in range(3)]
    for t in triples:
        assert set(t) == {
            "prompt",
            "reference",
            "chosen",
            "rejected",
            "chosen_policy",
            "rejected_policy",
        }
        ref_prompt, ref_policy, ref_sample = t["reference"].split("|")
        chosen_prompt, chosen_policy, chosen_sample = t["chosen"].split("|")
        rejected_prompt, rejected_policy, _ = t["rejected"].split("|")
        assert ref_prompt == chosen_prompt == rejected_prompt == t["prompt"]
        assert ref_policy == chosen_policy == t["chosen_policy"]
        assert ref_sample != chosen_sample
        assert rejected_policy == t["rejected_policy"] != t["chosen_policy"]


def test_same_seed_same_triples_other_seed_other_triples(tmp_path):
    rows = read_trajectories(str(write_rows(tmp_path / "t.jsonl", trajectories(20, samples=3))))
    first = polar_triples(rows, seed=7, per_prompt=2)
    assert polar_triples(rows, seed=7, per_prompt=2) == first
    assert polar_triples(rows, seed=8, per_prompt=2) != first


def test_output_does_not_depend_on_python_hash_seed(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", trajectories(20, samples=3))
    script = (
        "import json, sys; from jaxrm.data.polar_triples import polar_triples; "
        "from jaxrm.data.sources import open_source; s = open_source(sys.argv[1]); "
        "print(json.dumps(polar_triples((s.read(i) for i in range(len(s))), seed=3)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, str(path)],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


def test_policies_serve_as_a_and_b_equally_often(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", trajectories(200))
    triples = polar_triples(read_trajectories(str(path)), seed=0)
    as_a = Counter(t["chosen_policy"] for t in triples)
    as_b = Counter(t["rejected_policy"] for t in triples)
    mean = 200 / len(POLICIES)
    for policy in POLICIES:
        assert abs(as_a[policy] - mean) <= 2, as_a
        assert abs(as_b[policy] - mean) <= 2, as_b


def test_per_prompt_uses_every_reference_chosen_pair_before_repeating(tmp_path):
    rows = [{"prompt": "q", "policy": "a", "response": f"a{k}"} for k in range(3)]
    rows.append({"prompt": "q", "policy": "b", "response": "b0"})
    path = write_rows(tmp_path / "t.jsonl", rows)

    six = polar_triples(read_trajectories(str(path)), seed=0, per_prompt=6)
    assert len({(t["reference"], t["chosen"]) for t in six}) == 6
    seven = polar_triples(read_trajectories(str(path)), seed=0, per_prompt=7)
    assert len({(t["reference"], t["chosen"]) for t in seven}) == 6


def test_equal_message_prompts_group_together_and_come_back_as_given(tmp_path):
    prompt = [{"role": "user", "content": "hi"}]
    reordered = [{"content": "hi", "role": "user"}]
    rows = [
        {"prompt": prompt, "policy": "a", "response": "a0"},
        {"prompt": reordered, "policy": "a", "response": "a1"},
        {"prompt": prompt, "policy": "b", "response": "b0"},
    ]
    path = write_rows(tmp_path / "t.jsonl", rows)
    [triple] = polar_triples(read_trajectories(str(path)), seed=0)
    assert triple["prompt"] == prompt
    assert {triple["reference"], triple["chosen"]} == {"a0", "a1"}
    assert triple["rejected"] == "b0"


def test_prompt_with_one_policy_is_an_error_naming_its_first_line(tmp_path):
    rows = trajectories(1, policies=("a", "b"))
    rows += [{"prompt": "lonely", "policy": "a", "response": f"x{k}"} for k in range(2)]
    path = write_rows(tmp_path / "t.jsonl", rows)
    with pytest.raises(UserError, match=rf"^{path}:5: prompt 'lonely' .*one policy only \('a'\)"):
        polar_triples(read_trajectories(str(path)), seed=0)


def test_prompt_without_a_policy_with_two_samples_names_the_single_sample_policies(tmp_path):
    rows = [
        {"prompt": "q", "policy": "b", "response": "b0"},
        {"prompt": "q", "policy": "a", "response": "a0"},
    ]
    path = write_rows(tmp_path / "t.jsonl", rows)
    with pytest.raises(
        UserError, match=rf"^{path}:1: .*no policy with two samples \('a', 'b': only one"
    ):
        polar_triples(read_trajectories(str(path)), seed=0)


def test_malformed_trajectory_row_names_file_line_and_field(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": "q", "response": "r"}])
    with pytest.raises(UserError, match=rf"^{path}:1: field 'policy' is missing"):
        polar_triples(read_trajectories(str(path)), seed=0)


# ----------------------------------------------------------------------------- CodePMP

GOOD = "Here:\n```python\nprint(1)\n```\n"
WEAK = "```python\nprint(2)\n```"


def write_codepmp(tmp_path: Path, descriptions: list, strong: list, weak: list) -> tuple:
    return (
        str(write_rows(tmp_path / "descriptions.jsonl", descriptions)),
        str(write_rows(tmp_path / "strong.jsonl", strong)),
        str(write_rows(tmp_path / "weak.jsonl", weak)),
    )


def test_each_drop_reason_is_counted_and_the_first_duplicate_kept(tmp_path):
    descriptions = [
        {"id": 1, "prompt": "print one"},  # kept
        {"id": 2, "prompt": "no weak answer"},  # missing_id
        {"id": 3, "prompt": "blank strong"},  # empty_response
        {"id": 4, "prompt": "empty block"},  # empty_code_block
        {"id": 5, "prompt": "same answers"},  # identical
        {"id": 6, "prompt": "print one"},  # duplicate of id 1
        {"id": 7, "prompt": "  "},  # empty_prompt
        {"id": "8", "prompt": "print eight"},  # kept
        {"id": 9, "prompt": "print one"},  # kept: same prompt, other responses
    ]
    strong = [
        {"id": "1", "response": GOOD},
        {"id": 2, "response": GOOD},
        {"id": 3, "response": " \n "},
        {"id": 4, "response": GOOD},
        {"id": 5, "response": GOOD},
        {"id": 6, "response": GOOD},
        {"id": 7, "response": GOOD},
        {"id": 8, "response": "print(8)"},
        {"id": 9, "response": WEAK},
        {"id": 99, "response": GOOD},  # no description
    ]
    weak = [
        {"id": 1, "response": WEAK},
        {"id": 3, "response": WEAK},
        {"id": 4, "response": "```python\n\n```"},
        {"id": 5, "response": GOOD + "\n"},
        {"id": 6, "response": WEAK},
        {"id": 7, "response": WEAK},
        {"id": 8, "response": "print(0)"},
        {"id": 9, "response": GOOD},
    ]
    pairs, counts = codepmp_pairs(*write_codepmp(tmp_path, descriptions, strong, weak))

    assert pairs == [
        {"prompt": "print one", "chosen": GOOD, "rejected": WEAK},
        {"prompt": "print eight", "chosen": "print(8)", "rejected": "print(0)"},
        {"prompt": "print one", "chosen": WEAK, "rejected": GOOD},
    ]
    assert counts == {
        "kept": 3,
        "missing_id": 1,
        "empty_prompt": 1,
        "no_source": 0,
        "length": 0,
        "comment_density": 0,
        "empty_response": 1,
        "empty_code_block": 1,
        "identical": 1,
        "duplicate": 1,
        "unmatched_response": 1,
    }


def test_code_blocks_and_empty_ones():
    text = "a\n```python\nx = 1\n```\n```\n\n```\nsee ```inline``` here\n~~~\n"
    assert code_blocks(text) == ["x = 1", "", ""]
    assert code_blocks("no code at all") == []


PYTHON = '"""Add."""\ndef add(a, b):\n    s = "# no"  # sum\n    return a + b\n'
C = (
    "/* Sum. */\n"
    "int add(int a, int b) { // add\n"
    '  return a + b; /* "x" */\n'
    "}\n"
    'char *s = "// no /* no */";\n'
)


def test_comment_density_of_a_python_file_counted_by_hand():
    # Non-whitespace characters per line: 10, 12, 11, 9 = 42. Comments: the docstring (10) and
    # "# sum" (4); the "# no" inside a string is not one.
    assert comment_density(PYTHON, "python") == 14 / 42
    assert comment_density(PYTHON) == 14 / 42  # the syntax guessed from the text


def test_comment_density_of_a_c_file_counted_by_hand():
    # Non-whitespace characters per line: 8, 23, 17, 1, 20 = 69. Comments: "/* Sum. */" (8),
    # "// add" (5), '/* "x" */' (7); the markers inside the string literal are not comments.
    assert comment_density(C, "c") == 20 / 69
    assert comment_density(C) == 20 / 69


def test_comment_density_of_shell_skips_hash_inside_words_and_strings():
    # Non-whitespace: "echo" "$#" '"a' "#" 'b"' "#" "note" = 16; the comment "# note" is 5.
    assert comment_density('echo $# "a # b" # note\n', "bash") == 5 / 16
    assert comment_density(" \n\t") == 0.0


def source_pairs(tmp_path: Path, **bounds) -> tuple[list, dict]:
    sources = {
        "commented": PYTHON,  # 65 characters, density 1/3
        "bare": "x = 1\n",  # density 0
        "long": "x = 1  # one\n" * 20,  # 260 characters, density 4/7
    }
    descriptions = [
        {"id": name, "prompt": f"write {name}", "source": text, "language": "python"}
        for name, text in sources.items()
    ]
    descriptions.append({"id": "sourceless", "prompt": "write something"})
    responses = [{"id": d["id"], "response": f"```\n{d['id']}\n```"} for d in descriptions]
    weak = [{"id": d["id"], "response": "```\npass\n```"} for d in descriptions]
    return codepmp_pairs(*write_codepmp(tmp_path, descriptions, responses, weak), **bounds)


def test_source_filters_drop_what_they_should(tmp_path):
    assert len(PYTHON) == 65
    pairs, counts = source_pairs(tmp_path, min_comment_density=0.1, max_source_chars=100)
    assert [p["prompt"] for p in pairs] == ["write commented"]
    assert (counts["comment_density"], counts["length"], counts["no_source"]) == (1, 1, 1)

    pairs, counts = source_pairs(tmp_path, max_comment_density=0.4)
    assert [p["prompt"] for p in pairs] == ["write commented", "write bare"]
    assert (counts["comment_density"], counts["length"], counts["no_source"]) == (1, 0, 1)

    pairs, counts = source_pairs(tmp_path, min_source_chars=65)
    assert [p["prompt"] for p in pairs] == ["write commented", "write long"]
    assert (counts["comment_density"], counts["length"], counts["no_source"]) == (0, 1, 1)

    pairs, counts = source_pairs(tmp_path)
    assert len(pairs) == 4
    assert counts["no_source"] == 0


def test_nonsense_bounds_are_refused(tmp_path):
    with pytest.raises(UserError, match="--min-comment-density must be in"):
        source_pairs(tmp_path, min_comment_density=1.5)
    with pytest.raises(UserError, match="--min-source-chars is larger than --max-source-chars"):
        source_pairs(tmp_path, min_source_chars=10, max_source_chars=5)


def test_an_id_repeated_in_one_file_is_an_error_naming_both_lines(tmp_path):
    strong = [{"id": 1, "response": GOOD}, {"id": "1", "response": WEAK}]
    files = write_codepmp(tmp_path, [{"id": 1, "prompt": "p"}], strong, [])
    with pytest.raises(UserError, match=rf"^{files[1]}:2: id '1' already appears at {files[1]}:1$"):
        codepmp_pairs(*files)


def test_malformed_codepmp_rows_name_file_line_and_field(tmp_path):
    files = write_codepmp(tmp_path, [{"id": 1, "prompt": "p"}], [{"id": 1}], [])
    with pytest.raises(UserError, match=rf"^{files[1]}:1: field 'response' is missing"):
        codepmp_pairs(*files)
    files = write_codepmp(tmp_path, [{"id": [1], "prompt": "p"}], [], [])
    with pytest.raises(UserError, match=rf"^{files[0]}:1: field 'id' must be a string or an"):
        codepmp_pairs(*files)
    files = write_codepmp(tmp_path, [{"id": 1, "prompt": "p", "source": 3}], [], [])
    with pytest.raises(UserError, match=rf"^{files[0]}:1: field 'source' must be a string"):
        codepmp_pairs(*files)


# ----------------------------------------------------------------------------- command line


def test_polar_command_writes_its_file_and_refuses_to_overwrite_it(tmp_path, capsys):
    write_rows(tmp_path / "in-1.jsonl", trajectories(3, policies=("a", "b")))
    write_rows(tmp_path / "in-2.jsonl", trajectories(1, policies=("a", "b")))
    out = tmp_path / "out" / "triples.jsonl"
    argv = ["polar-triples", str(tmp_path / "in-*.jsonl"), "--out", str(out), "--per-prompt", "2"]
    run_cli(argv)

    lines = out.read_text().splitlines()
    assert len(lines) == 6
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes files, not private
    assert all(json.loads(line)["chosen_policy"] in ("a", "b") for line in lines)
    assert capsys.readouterr().out.splitlines() == [
        f"wrote 6 triples for 3 prompts to {out}",
        "policy A/B counts: a 3/3, b 3/3",
    ]
    before = out.read_text()
    with pytest.raises(UserError, match="already exists"):
        run_cli([*argv, "--seed", "1"])
    assert out.read_text() == before
    assert os.listdir(out.parent) == ["triples.jsonl"]


def test_codepmp_command_prints_every_count(tmp_path, capsys):
    files = write_codepmp(
        tmp_path,
        [{"id": 1, "prompt": "p", "source": PYTHON}, {"id": 2, "prompt": "q", "source": C}],
        [{"id": 1, "response": GOOD}, {"id": 2, "response": GOOD}],
        [{"id": 1, "response": WEAK}, {"id": 2, "response": WEAK}],
    )
    out = tmp_path / "pairs.jsonl"
    run_cli(
        [
            "codepmp-pairs",
            *("--descriptions", files[0], "--strong", files[1], "--weak", files[2]),
            *("--out", str(out), "--max-comment-density", "0.3"),
        ]
    )
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "q", "chosen": GOOD, "rejected": WEAK}
    ]
    assert capsys.readouterr().out == (
        f"wrote 1 pairs to {out}; dropped: missing_id 0, empty_prompt 0, no_source 0, length 0, "
        "comment_density 1, empty_response 0, empty_code_block 0, identical 0, duplicate 0; "
        "responses without a description: 0\n"
    )


def test_an_interrupted_write_leaves_nothing_behind(tmp_path):
    def rows_then_failure():
        yield {"prompt": "p"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_jsonl(rows_then_failure(), tmp_path / "out.jsonl")
    assert os.listdir(tmp_path) == []
