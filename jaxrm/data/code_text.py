"""Reading code inside text: fenced code blocks in a response, and comment density of a source.

Comment density (arXiv 2402.13013) is the share of a source's non-whitespace characters that are
comment text; CodePMP's source filter keeps files within bounds of it. Comments and strings are
told apart per syntax family (Python, C-like, hash-comment languages), so a `#` inside a string
is not a comment.
"""

import ast
import re

# The language names (lower-cased) of each comment syntax; other names are guessed from the text.
_LANGUAGES = {
    "python": "python py",
    "hash": "shell sh bash zsh ruby rb perl r yaml toml makefile dockerfile",
    "c": "c h c++ cpp cc hpp c# csharp cs java javascript js jsx typescript ts tsx go golang "
    "rust rs kotlin kt swift scala dart php objective-c objc",
}
_SYNTAX_OF_LANGUAGE = {
    name: syntax for syntax, names in _LANGUAGES.items() for name in names.split()
}
_PYTHON_LINE = re.compile(
    r"^\s*((def|class|if|elif|else|for|while|try|except|finally|with)\b[^\n]*:\s*(#.*)?$"
    r"|import \w|from [\w.]+ import )",
    re.MULTILINE,
)
_C_LINE = re.compile(r"[;{}]\s*$|^\s*(//|/\*)", re.MULTILINE)
_C_PREPROCESSOR = re.compile(r"^\s*#\s*(include|define|ifn?def|pragma)\b", re.MULTILINE)


def comment_syntax(source: str, language: str | None = None) -> str:
    """'python', 'c' (// and /* */) or 'hash' (# to end of line) for this file."""
    known = _SYNTAX_OF_LANGUAGE.get((language or "").strip().lower())
    if known:
        return known
    if source.startswith("#!"):
        return "python" if "python" in source.split("\n", 1)[0] else "hash"
    if _C_PREPROCESSOR.search(source):
        return "c"
    python, c_like = len(_PYTHON_LINE.findall(source)), len(_C_LINE.findall(source))
    if python and python >= c_like:
        return "python"
    return "c" if c_like else "hash"


def comment_density(source: str, language: str | None = None) -> float:
    """Share of comment characters among the non-whitespace characters of a source file.

    Comments are `#` lines (Python, shell, Ruby...), `//` lines and `/* */` blocks (C family,
    JS, Go, Rust, Java), and Python docstrings (a string literal standing alone as a statement);
    their delimiters count as comment characters. Markers inside string literals are skipped.
    The syntax comes from `language`, or is guessed from the text when that is missing or unknown.
    A file without non-whitespace characters has density 0.
    """
    total = sum(not c.isspace() for c in source)
    if total == 0:
        return 0.0
    spans = comment_spans(source, comment_syntax(source, language))
    comment = sum(not c.isspace() for start, end in spans for c in source[start:end])
    return comment / total


# The characters that open a string literal under each syntax.
_QUOTES = {"python": "'\"", "c": "'\"`", "hash": "'\""}


def comment_spans(text: str, syntax: str) -> list[tuple[int, int]]:
    """[start, end) character ranges of the comments of `text` under `syntax`."""
    spans = []
    depth = 0  # Python bracket depth: a string inside brackets is never a docstring
    i = 0
    while i < len(text):
        char = text[i]
        if _starts_line_comment(text, i, syntax):
            end = _end_of_line(text, i)
            spans.append((i, end))
        elif syntax == "c" and text.startswith("/*", i):
            close = text.find("*/", i + 2)
            end = len(text) if close < 0 else close + 2
            spans.append((i, end))
        elif char in _QUOTES[syntax]:
            end = _string_end(text, i, syntax)
            if syntax == "python" and depth == 0 and _is_docstring(text, i, end):
                spans.append((_prefix_start(text, i), end))
        else:
            if syntax == "python":
                depth = max(0, depth + (char in "([{") - (char in ")]}"))
            end = i + 1
        i = end
    return spans


def _starts_line_comment(text: str, i: int, syntax: str) -> bool:
    if syntax == "c":
        return text.startswith("//", i)
    if text[i] != "#":
        return False
    # In shell a # inside a word ($#, ${#x}) is no comment; Python has no such case.
    return syntax == "python" or i == 0 or text[i - 1].isspace() or text[i - 1] == ";"


def _end_of_line(text: str, i: int) -> int:
    newline = text.find("\n", i)
    return len(text) if newline < 0 else newline


def _string_end(text: str, start: int, syntax: str) -> int:
    """End of the string literal opening at `start`. Triple-quoted (Python) and backtick strings
    may span lines; others stop at the end of their line, so a stray apostrophe (a Rust
    lifetime, an unquoted "don't") hides at most the rest of one line."""
    quote = text[start]
    if syntax == "python" and text.startswith(quote * 3, start):
        quote = quote * 3
    multiline = len(quote) == 3 or quote == "`"
    i = start + len(quote)
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text.startswith(quote, i):
            return i + len(quote)
        elif text[i] == "\n" and not multiline:
            return i
        else:
            i += 1
    return len(text)


def _prefix_start(text: str, quote: int) -> int:
    """Start of a Python string literal including its prefix letters (r, b, u, f)."""
    start = quote
    while start > 0 and quote - start < 2 and text[start - 1] in "rRbBuUfF":
        start -= 1
    return start


def _is_docstring(text: str, quote: int, end: int) -> bool:
    """A string literal alone on its line(s): nothing but indentation before it and at most a
    comment after it, i.e. an expression statement, which is what a docstring is."""
    start = _prefix_start(text, quote)
    line_start = text.rfind("\n", 0, start) + 1
    after = text[end : _end_of_line(text, end)].strip()
    return not text[line_start:start].strip() and (not after or after.startswith("#"))


# A fence opens with three or more backticks or tildes; a backtick fence's info string holds no
# backtick (CommonMark), so ```x``` on one line is inline code, not a block.
_FENCE_OPEN = re.compile(r"^\s*(`{3,}(?!.*`)|~{3,})")


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text; an unclosed one runs to the end."""
    blocks: list[str] = []
    fence, lines = None, []
    for line in text.splitlines():
        if fence is None:
            opening = _FENCE_OPEN.match(line)
            if opening:
                fence, lines = opening.group(1), []
        elif _closes(line, fence):
            blocks.append("\n".join(lines))
            fence = None
        else:
            lines.append(line)
    if fence is not None:
        blocks.append("\n".join(lines))
    return blocks


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and stripped == fence[0] * len(stripped)


def has_empty_code_block(text: str) -> bool:
    """Whether a response announces code it does not give: any fenced block with no content."""
    return any(not block.strip() for block in code_blocks(text))


def changed_code(original: str, commented: str, language: str | None = None) -> str | None:
    """Why `commented` is not `original` with comments added, or None when it is.

    Python is compared by its syntax tree (`ast`), docstrings left out, so comments, docstrings
    and layout may change and nothing else: "unparsable" or "code_changed". Other languages have
    no parser here: their code is compared as a sequence of tokens (words and single punctuation
    characters) once comments are cut out, which layout does not change either."""
    syntax = comment_syntax(original, language)
    if syntax == "python":
        try:
            after = ast.parse(commented)
        except (SyntaxError, ValueError):
            return "unparsable"
        try:
            before = ast.parse(original)
        except (SyntaxError, ValueError):  # not Python after all: compare the tokens
            before = None
        if before is not None:
            same = ast.dump(_without_docstrings(before)) == ast.dump(_without_docstrings(after))
            return None if same else "code_changed"
    same = _code_tokens(original, syntax) == _code_tokens(commented, syntax)
    return None if same else "code_changed"


_TOKEN = re.compile(r"\w+|[^\w\s]")


def _code_tokens(text: str, syntax: str) -> list[str]:
    kept, start = [], 0
    for begin, end in comment_spans(text, syntax):
        kept.append(text[start:begin])
        start = end
    kept.append(text[start:])
    return _TOKEN.findall(" ".join(kept))


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree
