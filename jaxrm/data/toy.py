"""Toy datasets that a tiny model learns in a few minutes on a CPU, and a tokenizer for them.

    paths = write_toy_data("data/toy")      # polar_{train,eval}.jsonl, codepmp_{train,eval}.jsonl,
                                            # tokenizer.model + tokenizer_config.json

POLAR: six toy policies answer short questions about household things, each in its own style
(formal, casual, pirate, terse, numbered list, shouting) that shows in its words, punctuation,
length and layout. A prompt is answered by two policies A and B, twice each (`trajectory_rows`),
and gives two rows: reference and chosen are two different samples of one policy, rejected is
a sample of the other, once with A as the reference's policy (the row's `category`) and once
with B. So every style wins as often as it loses, for every prompt: only comparing a candidate
with the reference tells which one is chosen.

CodePMP: a strong coder writes a correct, documented function for a small task; a weak coder
writes it with two visible flaws (no docstring, a print instead of the return, debug output, a
TODO, two-space indents, a missing colon), sometimes garbled names and a subtle bug as well.

Evaluation rows ask about topics (POLAR) and tasks (CodePMP) that training rows never ask about.
Everything is drawn from `random.Random` with fixed seeds: the same arguments give the same rows,
and a longer list starts with the shorter one. `configs/toy/` holds `write_toy_data` with its
defaults (`jaxrm data toy --out configs/toy`).
"""

import argparse
import dataclasses
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxrm.data.toy_tokenizer import train_tokenizer
from jaxrm.storage import require_new_dir, staged_directory

Row = dict[str, Any]

# ----------------------------------------------------------------------------- POLAR

NOUNS = (
    "garden", "bicycle", "kettle", "violin", "laptop", "tent", "boat", "lamp", "piano", "camera",
    "sofa", "window", "fence", "bucket", "helmet", "clock", "drone", "ladder", "oven", "guitar",
    "kite", "drum", "radio", "hammer",
)  # fmt: skip
VERBS = ("clean", "fix", "paint", "check", "oil", "wash", "polish", "test")
ADJECTIVES = ("small", "rusty", "noisy", "shiny", "wet", "heavy", "quiet", "dusty")
# A prompt asks about a topic (an adjective and a thing). Evaluation prompts ask about the fifth
# of the topics that training prompts never ask about; their words do occur in training, since a
# model trained from scratch knows nothing of a word it never saw.
TOPICS = [(adj, noun) for adj in ADJECTIVES for noun in NOUNS]
EVAL_TOPICS = [t for i, t in enumerate(TOPICS) if i % 5 == 0]
TRAIN_TOPICS = [t for i, t in enumerate(TOPICS) if i % 5]
# Prompts name their topic and nothing else: a word that varied between prompts of one topic
# (a verb, say) would only give a small model something to memorise.
QUESTIONS = (
    "Why is my {noun} so {adj}?",
    "Tips for a {adj} {noun}?",
    "Is a {adj} {noun} worth it?",
    "Help with my {adj} {noun}?",
    "What about my {adj} {noun}?",
)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A way of answering: openers, sentences ({noun}, {verb}, {adj} filled in) and closers."""

    openers: tuple[str, ...]
    sentences: tuple[str, ...]
    closers: tuple[str, ...]
    count: tuple[int, int]  # sentences per answer, inclusive
    joiner: str = " "
    numbered: bool = False
    case: Callable[[str], str] | None = None


# The styles differ in case, punctuation and layout as well as in words, since a tiny model picks
# those up first: pirate exclaims in short bursts and formal writes commas and full stops because,
# as plain sentences both, they were the pair it confused most.
POLICIES = {
    "formal": Policy(
        ("Certainly.", "Indeed.", "Kindly note:"),
        (
            "One should, of course, treat the {noun} with care.",
            "I would advise regular maintenance, naturally.",
            "Such matters, I believe, merit attention.",
        ),
        ("Regards.", "Respectfully.", ""),
        (1, 1),
    ),
    "casual": Policy(
        ("hey", "lol ok", "omg"),
        ("just wing it tbh", "ur {noun} is fine lol", "dont stress haha"),
        (":)", ":D", ""),
        (1, 1),
    ),
    "pirate": Policy(
        ("Arr!", "Ahoy!", "Avast!"),
        ("Yo ho!", "Ye dog!", "Guard yer {noun}!", "Blimey!", "Yer {noun} be gold!"),
        ("Arr!", ""),
        (2, 2),
    ),
    "terse": Policy(("",), ("Yes.", "No.", "Fine.", "Depends.", "Maybe.", "Sure."), ("",), (1, 2)),
    "lister": Policy(
        ("Steps:", "Plan:"),
        ("{verb} the {noun}", "check twice", "wait a bit", "repeat"),
        ("",),
        (2, 3),
        joiner="\n",
        numbered=True,
    ),
    "shouting": Policy(
        ("WOW!!!", "HEY!!!"),
        ("love the {noun}!!!", "best thing ever!!!", "never give up!!!"),
        ("YES!!!", ""),
        (1, 1),
        case=str.upper,
    ),
}


def _fill(template: str, rng: random.Random, noun: str, adj: str | None = None) -> str:
    return template.format(noun=noun, verb=rng.choice(VERBS), adj=adj or rng.choice(ADJECTIVES))


def answer(policy: Policy, noun: str, rng: random.Random) -> str:
    """One sample of `policy` answering a question about `noun`."""
    picked = rng.sample(policy.sentences, rng.randint(*policy.count))
    lines = [_fill(s, rng, noun) for s in picked]
    if policy.numbered:
        lines = [f"{i}) {line}" for i, line in enumerate(lines, 1)]
    parts = [rng.choice(policy.openers), *lines, rng.choice(policy.closers)]
    text = policy.joiner.join(p for p in parts if p)
    return policy.case(text) if policy.case else text


def trajectory_rows(prompts: int, seed: int = 0, held_out: bool = False) -> list[Row]:
    """Rows {prompt, policy, response}: per prompt, two samples of each of two policies.

    `prompts` different prompts about TRAIN_TOPICS, or about EVAL_TOPICS when `held_out`. The
    rows of a prompt are four in a row: policy A's two different samples, then policy B's.
    """
    split = "eval" if held_out else "train"
    rng = random.Random(f"toy-polar-{split}-{seed}")
    topics = EVAL_TOPICS if held_out else TRAIN_TOPICS
    if prompts > len(topics) * len(QUESTIONS):
        raise ValueError(f"there are only {len(topics) * len(QUESTIONS)} different {split} prompts")
    asked: set[str] = set()
    rows = []
    while len(asked) < prompts:
        adj, noun = rng.choice(topics)
        prompt = _fill(rng.choice(QUESTIONS), rng, noun, adj)
        if prompt in asked:
            continue
        asked.add(prompt)
        for name in rng.sample(sorted(POLICIES), 2):
            first = second = answer(POLICIES[name], noun, rng)
            while second == first:
                second = answer(POLICIES[name], noun, rng)
            rows += [{"prompt": prompt, "policy": name, "response": r} for r in (first, second)]
    return rows


def polar_rows(count: int, seed: int = 0, held_out: bool = False) -> list[Row]:
    """`count` rows {prompt, reference, chosen, rejected, category}, two per prompt.

    With A1 A2 B1 B2 the samples of `trajectory_rows`, a prompt gives (A1, A2, B1) and then
    (B1, B2, A1) as (reference, chosen, rejected). Each style is chosen once and rejected once
    per prompt, so nothing but the reference tells the candidates apart: a model cannot score
    well by learning which styles (or topics) tend to win.
    """
    samples = trajectory_rows((count + 1) // 2, seed, held_out)
    rows = []
    for i in range(0, len(samples), 4):
        a1, a2, b1, b2 = samples[i : i + 4]
        for reference, chosen, rejected in ((a1, a2, b1), (b1, b2, a1)):
            rows.append(
                {
                    "prompt": reference["prompt"],
                    "reference": reference["response"],
                    "chosen": chosen["response"],
                    "rejected": rejected["response"],
                    "category": reference["policy"],
                }
            )
    return rows[:count]


# ----------------------------------------------------------------------------- CodePMP


@dataclasses.dataclass(frozen=True)
class Task:
    """A small function to write. {xs} {s} {n} {d} are parameters, {k} a number, {c} a letter."""

    category: str
    name: str
    params: str
    doc: str
    body: str  # indented by four spaces per level, relative to the function body


TASKS = (
    Task("lists", "sum_even", "{xs}", "Return the sum of the even numbers in {xs}.",
         "total = 0\nfor x in {xs}:\n    if x % 2 == 0:\n        total += x\nreturn total"),
    Task("lists", "count_above", "{xs}", "Return how many numbers in {xs} are greater than {k}.",
         "count = 0\nfor x in {xs}:\n    if x > {k}:\n        count += 1\nreturn count"),
    Task("lists", "add_to_all", "{xs}", "Return {xs} with {k} added to every number.",
         "return [x + {k} for x in {xs}]"),
    Task("lists", "largest", "{xs}", "Return the largest number in {xs}, or None if empty.",
         "if not {xs}:\n    return None\nbest = {xs}[0]\nfor x in {xs}:\n    if x > best:\n"
         "        best = x\nreturn best"),
    Task("lists", "mean", "{xs}", "Return the mean of {xs}, or 0.0 if it is empty.",
         "if not {xs}:\n    return 0.0\nreturn sum({xs}) / len({xs})"),
    Task("lists", "multiples", "{xs}", "Return the numbers in {xs} that are multiples of {k}.",
         "return [x for x in {xs} if x % {k} == 0]"),
    Task("lists", "cap_all", "{xs}", "Return {xs} with every number limited to at most {k}.",
         "return [min(x, {k}) for x in {xs}]"),
    Task("lists", "product", "{xs}", "Return the product of the numbers in {xs}.",
         "result = 1\nfor x in {xs}:\n    result *= x\nreturn result"),
    Task("lists", "running_totals", "{xs}", "Return the running totals of {xs}.",
         "totals = []\ntotal = 0\nfor x in {xs}:\n    total += x\n    totals.append(total)\n"
         "return totals"),
    Task("lists", "find_index", "{xs}", "Return the index of the first {k} in {xs}, or -1.",
         "for i, x in enumerate({xs}):\n    if x == {k}:\n        return i\nreturn -1"),
    Task("lists", "unique", "{xs}", "Return {xs} without repeated numbers, in order.",
         "seen = set()\nresult = []\nfor x in {xs}:\n    if x not in seen:\n        seen.add(x)\n"
         "        result.append(x)\nreturn result"),
    Task("numbers", "factorial", "{n}", "Return the factorial of {n}.",
         "result = 1\nfor i in range(2, {n} + 1):\n    result *= i\nreturn result"),
    Task("numbers", "is_prime", "{n}", "Return True if {n} is a prime number.",
         "if {n} < 2:\n    return False\nfor i in range(2, int({n} ** 0.5) + 1):\n"
         "    if {n} % i == 0:\n        return False\nreturn True"),
    Task("numbers", "digit_sum", "{n}", "Return the sum of the digits of {n}.",
         "total = 0\nwhile {n} > 0:\n    total += {n} % 10\n    {n} //= 10\nreturn total"),
    Task("numbers", "fizz", "{n}", "Return 'fizz' if {k} divides {n}, else {n} as text.",
         "if {n} % {k} == 0:\n    return 'fizz'\nreturn str({n})"),
    Task("numbers", "fibonacci", "{n}", "Return the {n}-th Fibonacci number.",
         "a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, a + b\nreturn a"),
    Task("numbers", "gcd_with", "{n}", "Return the greatest common divisor of {n} and {k}.",
         "a, b = {n}, {k}\nwhile b:\n    a, b = b, a % b\nreturn a"),
    Task("strings", "count_vowels", "{s}", "Return the number of vowels in {s}.",
         "return sum(1 for ch in {s} if ch in 'aeiou')"),
    Task("strings", "reverse_words", "{s}", "Return {s} with its words in reverse order.",
         "return ' '.join(reversed({s}.split()))"),
    Task("strings", "is_palindrome", "{s}", "Return True if {s} reads the same backwards.",
         "cleaned = {s}.lower()\nreturn cleaned == cleaned[::-1]"),
    Task("strings", "title_words", "{s}", "Return {s} with every word capitalised.",
         "return ' '.join(w.capitalize() for w in {s}.split())"),
    Task("strings", "shorten", "{s}", "Return {s} cut to at most {k} characters.",
         "return {s}[:{k}]"),
    Task("strings", "count_letter", "{s}", "Return how often the letter '{c}' is in {s}.",
         "return {s}.count('{c}')"),
    Task("dicts", "invert", "{d}", "Return {d} with keys and values swapped.",
         "return {value: key for key, value in {d}.items()}"),
    Task("dicts", "sum_values", "{d}", "Return the sum of the values in {d}.",
         "return sum({d}.values())"),
    Task("dicts", "above", "{d}", "Return the items of {d} whose value is above {k}.",
         "return {key: value for key, value in {d}.items() if value > {k}}"),
    Task("lists", "count_even", "{xs}", "Return how many numbers in {xs} are even.",
         "return sum(1 for x in {xs} if x % 2 == 0)"),
    Task("lists", "squares", "{xs}", "Return the squares of the numbers in {xs}.",
         "return [x * x for x in {xs}]"),
    Task("lists", "smallest", "{xs}", "Return the smallest number in {xs}.",
         "return min({xs})"),
    Task("lists", "last_few", "{xs}", "Return the last {k} numbers of {xs}.",
         "return {xs}[-{k}:]"),
    Task("lists", "total_above", "{xs}", "Return the sum of the numbers in {xs} above {k}.",
         "return sum(x for x in {xs} if x > {k})"),
    Task("lists", "has_negative", "{xs}", "Return True if {xs} holds a negative number.",
         "return any(x < 0 for x in {xs})"),
    Task("lists", "neighbour_sums", "{xs}", "Return the sums of neighbouring numbers in {xs}.",
         "return [a + b for a, b in zip({xs}, {xs}[1:])]"),
    Task("numbers", "is_even", "{n}", "Return True if {n} is even.",
         "return {n} % 2 == 0"),
    Task("numbers", "square", "{n}", "Return {n} squared.",
         "return {n} * {n}"),
    Task("numbers", "clamp", "{n}", "Return {n} limited to the range 0 to {k}.",
         "return max(0, min({n}, {k}))"),
    Task("numbers", "sum_to", "{n}", "Return the sum of the numbers from 1 to {n}.",
         "total = 0\nfor i in range(1, {n} + 1):\n    total += i\nreturn total"),
    Task("numbers", "is_multiple", "{n}", "Return True if {n} is a multiple of {k}.",
         "return {n} % {k} == 0"),
    Task("numbers", "sign", "{n}", "Return the sign of {n}: -1, 0 or 1.",
         "if {n} < 0:\n    return -1\nif {n} > 0:\n    return 1\nreturn 0"),
    Task("strings", "shout", "{s}", "Return {s} in upper case with '!' added.",
         "return {s}.upper() + '!'"),
    Task("strings", "word_count", "{s}", "Return the number of words in {s}.",
         "return len({s}.split())"),
    Task("strings", "starts_with", "{s}", "Return True if {s} starts with '{c}'.",
         "return {s}.startswith('{c}')"),
    Task("strings", "first_word", "{s}", "Return the first word of {s}, or '' if none.",
         "words = {s}.split()\nreturn words[0] if words else ''"),
    Task("strings", "reverse", "{s}", "Return {s} reversed.",
         "return {s}[::-1]"),
    Task("dicts", "max_value", "{d}", "Return the largest value in {d}.",
         "return max({d}.values())"),
    Task("dicts", "has_key", "{d}", "Return True if {d} has the key '{c}'.",
         "return '{c}' in {d}"),
    Task("dicts", "value_or_zero", "{d}", "Return {d}['{c}'], or 0 if it is missing.",
         "return {d}.get('{c}', 0)"),
    # Held out for evaluation.
    Task("lists", "spread", "{xs}", "Return the largest minus the smallest number in {xs}.",
         "return max({xs}) - min({xs})"),
    Task("lists", "chunks", "{xs}", "Split {xs} into lists of {k} numbers.",
         "return [{xs}[i : i + {k}] for i in range(0, len({xs}), {k})]"),
    Task("lists", "is_sorted", "{xs}", "Return True if {xs} never decreases.",
         "for i in range(1, len({xs})):\n    if {xs}[i - 1] > {xs}[i]:\n        return False\n"
         "return True"),
    Task("numbers", "power", "{n}", "Return {n} raised to the power {k}.",
         "result = 1\nfor _ in range({k}):\n    result *= {n}\nreturn result"),
    Task("numbers", "count_digits", "{n}", "Return how many digits {n} has.",
         "count = 1\nwhile {n} >= 10:\n    {n} //= 10\n    count += 1\nreturn count"),
    Task("strings", "longest_word", "{s}", "Return the longest word in {s}.",
         "words = {s}.split()\nif not words:\n    return ''\nreturn max(words, key=len)"),
    Task("strings", "initials", "{s}", "Return the first letter of each word in {s}, upper case.",
         "return ''.join(w[0].upper() for w in {s}.split())"),
    Task("strings", "no_vowels", "{s}", "Return {s} without its vowels.",
         "return ''.join(ch for ch in {s} if ch not in 'aeiou')"),
    Task("dicts", "key_of_max", "{d}", "Return the key of {d} with the largest value.",
         "best = None\nfor key, value in {d}.items():\n    if best is None or value > {d}[best]:\n"
         "        best = key\nreturn best"),
    Task("dicts", "sorted_keys", "{d}", "Return the keys of {d}, smallest value first.",
         "return sorted({d}, key={d}.get)"),
    Task("dicts", "keys_above", "{d}", "Return the keys of {d} whose value is above {k}.",
         "return [key for key, value in {d}.items() if value > {k}]"),
)  # fmt: skip
EVAL_TASKS = 11  # the last ones

# Parameter names a strong coder picks, and what a weak one garbles them into.
GOOD_NAMES = {
    "xs": ("values", "numbers", "nums", "items"),
    "s": ("text", "line", "sentence", "phrase"),
    "n": ("n", "number", "num"),
    "d": ("counts", "table", "scores", "mapping"),
}
BAD_NAMES = ("x", "lst", "a1", "thing", "inp", "tmp")
BAD_FUNCTION_NAMES = ("f", "func", "do_it", "foo", "my_func2", "solve")
# Subtle bugs: the first text replaced by the second, somewhere in the body.
MUTATIONS = (
    (" > ", " < "),
    (" >= ", " > "),
    (" + ", " - "),
    (" == ", " != "),
    (" *= ", " += "),
    ("[::-1]", "[::1]"),
    ("range(2,", "range(1,"),
    ("return True", "return False"),
)
PLACEHOLDER = re.compile(r"\{(xs|s|n|d|k|c)\}")


def _substitute(text: str, names: dict[str, str]) -> str:
    # Not str.format: the code holds literal braces (dict comprehensions).
    return PLACEHOLDER.sub(lambda m: names[m.group(1)], text)


def _function(task: Task, name: str, names: dict[str, str]) -> list[str]:
    header = f"def {name}({_substitute(task.params, names)}):"
    body = _substitute(task.body, names).split("\n")
    return [header, f'    """{_substitute(task.doc, names)}"""', *("    " + b for b in body)]


def _print_not_return(lines: list[str], rng: random.Random) -> list[str]:
    *head, last = lines
    return [*head, "    print(" + last.removeprefix("    return ") + ")"]


def _todo(lines: list[str], rng: random.Random) -> list[str]:
    comment = rng.choice(("# TODO fix this", "# not sure this works", "# hack"))
    return [*lines[:-1], "    " + comment, lines[-1]]


def _debug_print(lines: list[str], rng: random.Random) -> list[str]:
    return [lines[0], "    print(" + rng.choice(("'here'", "'debug'", "'ok'")) + ")", *lines[1:]]


def _no_docstring(lines: list[str], rng: random.Random) -> list[str]:
    return [line for line in lines if not line.startswith('    """')]


def _two_space_indent(lines: list[str], rng: random.Random) -> list[str]:
    return [re.sub("^((?:    )+)", lambda m: "  " * (len(m.group(1)) // 4), s) for s in lines]


def _no_colon(lines: list[str], rng: random.Random) -> list[str]:
    return [lines[0].removesuffix(":"), *lines[1:]]


# Visible flaws, in the order they are applied: each finds what it changes (the final return,
# the docstring, four-space indents, the header's colon) before a later one alters it.
FLAWS = (_print_not_return, _todo, _debug_print, _no_docstring, _two_space_indent, _no_colon)


def _mutation(lines: list[str], rng: random.Random) -> list[str]:
    """A subtle bug: one operator or constant of the body changed, where the body has one."""
    header, *body = lines
    code = "\n".join(body)
    found = [m for m in MUTATIONS if m[0] in code]
    if not found:
        return lines
    old, new = rng.choice(found)
    return [header, *code.replace(old, new, 1).split("\n")]


def codepmp_row(task: Task, rng: random.Random) -> Row:
    """A strong coder's function (chosen) and a weak coder's (rejected) for one draw of `task`."""
    names = {key: rng.choice(choices) for key, choices in GOOD_NAMES.items()}
    names |= {"k": str(rng.randint(2, 9)), "c": rng.choice("aeiou")}
    weak_name, weak_names = task.name, names
    if rng.random() < 0.4:  # garbled names: a flaw beside the others
        weak_name = rng.choice(BAD_FUNCTION_NAMES)
        weak_names = {**names, **{key: rng.choice(BAD_NAMES) for key in GOOD_NAMES}}
    weak = _function(task, weak_name, weak_names)
    if rng.random() < 0.5:
        weak = _mutation(weak, rng)
    for i in sorted(rng.sample(range(len(FLAWS)), 2)):
        weak = FLAWS[i](weak, rng)
    signature = f"{task.name}({_substitute(task.params, names)})"
    return {
        "prompt": f"Write a Python function {signature}. {_substitute(task.doc, names)}",
        "chosen": "\n".join(_function(task, task.name, names)),
        "rejected": "\n".join(weak),
        "category": task.category,
    }


def codepmp_rows(count: int, seed: int = 0, held_out: bool = False) -> list[Row]:
    """`count` CodePMP rows {prompt, chosen, rejected, category}, cycling through the tasks.

    `held_out` draws from the last EVAL_TASKS tasks, which training rows never use.
    """
    split = "eval" if held_out else "train"
    rng = random.Random(f"toy-codepmp-{split}-{seed}")
    tasks = TASKS[-EVAL_TASKS:] if held_out else TASKS[:-EVAL_TASKS]
    return [codepmp_row(tasks[i % len(tasks)], rng) for i in range(count)]


# ----------------------------------------------------------------------------- files


def write_toy_data(
    out_dir: str | Path,
    seed: int = 0,
    polar_train: int = 960,
    polar_eval: int = 100,
    codepmp_train: int = 128,
    codepmp_eval: int = 33,
) -> dict[str, Path]:
    """Writes the four JSONL files and a tokenizer trained on the training rows into `out_dir`.

    Returns their paths by name: polar_train, polar_eval, codepmp_train, codepmp_eval, tokenizer.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = {
        "polar_train": polar_rows(polar_train, seed),
        "polar_eval": polar_rows(polar_eval, seed, held_out=True),
        "codepmp_train": codepmp_rows(codepmp_train, seed),
        "codepmp_eval": codepmp_rows(codepmp_eval, seed, held_out=True),
    }
    paths = {}
    for name, rows in datasets.items():
        paths[name] = out_dir / f"{name}.jsonl"
        lines = (json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
        paths[name].write_text("".join(lines))
    texts = [
        text
        for name in ("polar_train", "codepmp_train")
        for row in datasets[name]
        for key, text in row.items()
        if key != "category"
    ]
    paths["tokenizer"] = train_tokenizer(texts, out_dir)
    return paths


def add_command(data_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers `toy` under `jaxrm data`."""
    toy = data_commands.add_parser(
        "toy",
        help="write the toy POLAR and CodePMP datasets and a tokenizer for them",
        description="Write polar_train.jsonl, polar_eval.jsonl (toy policies that differ in "
        "style), codepmp_train.jsonl, codepmp_eval.jsonl (a strong and a weak coder's "
        "functions) and a SentencePiece tokenizer trained on the training rows into a new "
        "directory. Evaluation rows use prompts that training rows never use.",
    )
    toy.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory")
    toy.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    toy.set_defaults(run=cmd_toy)


def cmd_toy(args: argparse.Namespace) -> None:
    out = require_new_dir(args.out, "--out directory")
    with staged_directory(out) as staging:
        paths = write_toy_data(staging, args.seed)
    for name, path in paths.items():
        print(f"{name}: {out / path.name}")
