"""Comment augmentation: the check that an answer only adds comments, the review of answers, and
`jaxrm data comment-augment` end to end with a tiny local model."""

import json

import pytest
from test_generate import models, read  # noqa: F401 (fixture)

from jaxrm.cli import main
from jaxrm.data.code_text import changed_code, comment_density
from jaxrm.generate.codepmp import read_sources
from jaxrm.generate.comment_augment import COMMENT_TEMPLATE, _opens_block, review

PYTHON = "def area(w, h):\n    if w < 0:\n        raise ValueError(w)\n    return w * h\n"
C = "int area(int w, int h) {\n  if (w < 0) return -1;\n  return w * h;\n}\n"
SHELL = 'for f in *.txt; do\n  echo "$f #1"\ndone\n'


@pytest.mark.parametrize(
    "original, candidate, language, reason",
    [
        (
            PYTHON,
            '# Area of a rectangle.\ndef area(w, h):\n    """w times h."""\n    if w < 0:  # no '
            "negative sides\n        raise ValueError(w)\n    return w * h\n",
            "python",
            None,
        ),
        (
            PYTHON,
            PYTHON.replace("    return w * h", "    return (w *\n            h)"),
            "python",
            None,
        ),
        (PYTHON, PYTHON.replace("w * h", "w * h + 1"), "python", "code_changed"),
        (PYTHON, PYTHON.replace("raise ValueError(w)", "pass"), "python", "code_changed"),
        (PYTHON, PYTHON.replace("def area(w, h):", "def area(w, h)"), "python", "unparsable"),
        (
            C,
            "/* Area of a rectangle. */\nint area(int w, int h) {\n  // no negative sides\n"
            "  if (w < 0) return -1;\n  return w * h;  /* the area */\n}\n",
            "c",
            None,
        ),
        (C, C.replace("return -1", "return 0"), "c", "code_changed"),
        (C, C.replace("w * h", "w*h"), "c", None),
        (C, C.replace("return w * h;", "// return w * h;"), "c", "code_changed"),
        (SHELL, "# print names\n" + SHELL.replace("done", "done  # end"), "bash", None),
        (SHELL, SHELL.replace('"$f #1"', '"$f"'), "bash", "code_changed"),
    ],
)
def test_only_comments_may_change(original, candidate, language, reason):
    assert changed_code(original, candidate, language) == reason


def test_review_keeps_commented_versions_and_counts_the_rest():
    sources = [
        {"id": "a.py", "source": PYTHON, "language": "python"},
        {"id": "b.c", "source": C, "language": "c"},
        {"id": "c.py", "source": PYTHON, "language": "python"},
        {"id": "d.py", "source": "# all comment\nx = 1  # one\n", "language": "python"},
        {"id": "e.c", "source": C, "language": "c"},
    ]
    commented = "# Area of a rectangle.\n" + PYTHON
    answers = [
        commented + "```\nSome talk after the block.",  # the default template opened the block
        C.replace("w * h", "w + h") + "```",
        PYTHON + "```",  # nothing added
        "```",
    ]
    assert _opens_block(COMMENT_TEMPLATE)
    rows, reasons = review(sources, [0, 1, 2, 4], answers, opened=True)
    assert [r["augmented"] for r in rows] == [True, False, False, False, False]
    assert rows[0]["source"] == commented
    assert [r["source"] for r in rows[1:]] == [s["source"] for s in sources[1:]]
    assert reasons == {"code_changed": 1, "no_comment_added": 1, "no_code": 1}
    assert [r.get("rejected") for r in rows] == [
        None,
        "code_changed",
        "no_comment_added",
        None,
        "no_code",
    ]
    assert rows[0]["comment_density"] > rows[0]["original_comment_density"] == 0
    # A template that does not open a block: the answer's first code block is the code.
    rows, _ = review(sources[:1], [0], [f"Here:\n```python\n{commented}```\n"], opened=False)
    assert rows[0]["augmented"] and rows[0]["source"] == commented


def test_comment_augment_end_to_end_counts_what_it_rejects(models, tmp_path, capsys):  # noqa: F811
    code = tmp_path / "code"
    code.mkdir()
    (code / "plain.py").write_text(PYTHON)
    (code / "plain.c").write_text(C)
    commented = "# " + "explained at length " * 20 + "\n" + PYTHON
    (code / "commented.py").write_text(commented)
    (tmp_path / "augment.yaml").write_text(
        f"""
sources: ["code/*"]
out: augmented.jsonl
work_dir: work
batch_size: 4
commenter: {{model: {models / "llama"}, overrides: [model.dtype=float32],
             sampling: {{max_new_tokens: 24}}, template: "{{source}}\\n```{{language}}\\n"}}
"""
    )
    assert main(["data", "comment-augment", str(tmp_path / "augment.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read(tmp_path / "augmented.jsonl")
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 3 and summary["sources"] == 3 and summary["asked"] == 2
    # A tiny random model writes no valid commented code: each answer is rejected and counted,
    # and its source goes out as it was.
    assert summary["augmented"] + sum(summary["rejected"].values()) == 2
    assert len(read(tmp_path / "work" / "commenter.jsonl")) == 2
    assert by_id[str(code / "commented.py")]["source"] == commented
    assert "rejected" not in by_id[str(code / "commented.py")]
    for row in rows:
        assert row["comment_density"] == pytest.approx(
            comment_density(row["source"], row["language"])
        )
    assert summary["comment_density"]["all"]["before"] == pytest.approx(
        sum(r["original_comment_density"] for r in rows) / 3, abs=1e-4
    )
    # The output is a source file for codepmp-generate.
    assert [s["source"] for s in read_sources([str(tmp_path / "augmented.jsonl")], tmp_path)] == [
        r["source"] for r in rows
    ]

    assert main(["data", "comment-augment", str(tmp_path / "augment.yaml")]) == 1
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(
        "sources: x\nout: o\nwork_dir: w\nbelow_density: 2\ncommenter: {model: m}\n"
    )
    assert main(["data", "comment-augment", str(tmp_path / "bad.yaml")]) == 1
    assert "below_density" in capsys.readouterr().err
