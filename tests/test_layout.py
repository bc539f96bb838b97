"""The package's rooms depend in one direction, and the command tree stays what users call.

Every import in jaxrm/ (at module level, inside functions and under TYPE_CHECKING alike) is read
from the source and mapped to the room it lives in: a folder (`jaxrm/model/`) or a top-level
module (`jaxrm/config.py`). A room may import itself and rooms of a lower rank only; rooms of
one rank are independent of each other.
"""

import argparse
import ast
import graphlib
import sys
from pathlib import Path

import pytest

from jaxrm import cli

PACKAGE = Path(__file__).resolve().parents[1] / "jaxrm"

# Lowest first. Rooms of one rank never import each other.
RANKS = (
    ("errors", "presets"),
    ("storage", "sharding", "http_server"),
    ("config",),
    ("model", "data"),
    ("hf",),
    ("checkpoint",),
    ("train", "scoring"),
    ("generate",),
    ("tpu",),
    ("demo",),
    ("cli",),
    ("__main__",),
)
RANK = {room: rank for rank, rooms in enumerate(RANKS) for room in rooms}
JAX_FREE = "scoring/client.py"  # RL workers import it without JAX or numpy

COMMANDS = [
    "jaxrm",
    "jaxrm config",
    "jaxrm train",
    "jaxrm presets",
    "jaxrm import",
    "jaxrm export",
    "jaxrm data",
    "jaxrm data prepare",
    "jaxrm data stats",
    "jaxrm data polar-triples",
    "jaxrm data codepmp-pairs",
    "jaxrm data toy",
    "jaxrm data prefixes",
    "jaxrm data polar-pool",
    "jaxrm data codepmp-generate",
    "jaxrm data comment-augment",
    "jaxrm eval",
    "jaxrm best-of-n",
    "jaxrm score",
    "jaxrm serve",
    "jaxrm serve-lm",
    "jaxrm generate",
    "jaxrm plot",
    "jaxrm scaling",
    "jaxrm scaling fit",
    "jaxrm salience",
    "jaxrm salience collect",
    "jaxrm salience fit",
    "jaxrm compile-check",
    "jaxrm demo",
]


def room_of(relative: Path) -> str:
    return relative.with_suffix("").parts[0]


def imported_modules(relative: Path, source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the source of jaxrm/`relative`, relative imports
    resolved."""
    package = ["jaxrm", *relative.parent.parts]
    found = []
    for node in ast.walk(ast.parse(source, str(relative))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module == "jaxrm" or (node.level and not node.module):
                # `from jaxrm import losses`: the names are modules or folders themselves
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def imported_rooms(relative: Path, source: str) -> list[tuple[int, str]]:
    modules = imported_modules(relative, source)
    return [(line, m.split(".")[1]) for line, m in modules if m.startswith("jaxrm.")]


def package_sources() -> dict[Path, str]:
    return {p.relative_to(PACKAGE): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def layering_errors(sources: dict[Path, str]) -> list[str]:
    wrong = []
    for relative, source in sources.items():
        room = room_of(relative)
        if room == "__init__":
            continue
        for line, target in imported_rooms(relative, source):
            if target != room and RANK.get(target, len(RANKS)) >= RANK[room]:
                wrong.append(f"jaxrm/{relative}:{line}: {room} imports {target}")
    return wrong


def test_every_module_is_in_a_ranked_room() -> None:
    unranked = {room_of(p) for p in package_sources()} - set(RANK) - {"__init__"}
    assert not unranked, f"rooms missing from RANKS in tests/test_layout.py: {sorted(unranked)}"


def test_rooms_import_only_themselves_and_lower_rooms() -> None:
    wrong = layering_errors(package_sources())
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layering_check_catches_upward_and_sideways_imports() -> None:
    decoder = (PACKAGE / "model/decoder.py").read_text()
    late_import = decoder.count("\n") + 4
    sources = {
        Path("model/decoder.py"): decoder
        + "\n\ndef _late():\n    from jaxrm.train.loop import train\n",
        Path("model/matmul.py"): "from ..data import sources\n",
        Path("config.py"): "import jaxrm.cli\n",
    }
    assert layering_errors(sources) == [
        f"jaxrm/model/decoder.py:{late_import}: model imports train",
        "jaxrm/model/matmul.py:1: model imports data",
        "jaxrm/config.py:1: config imports cli",
    ]


def test_no_circle_between_rooms() -> None:
    graph: dict[str, set[str]] = {}
    for relative, source in package_sources().items():
        room = room_of(relative)
        graph.setdefault(room, set()).update(
            t for _, t in imported_rooms(relative, source) if t != room
        )
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"rooms import each other in a circle: {' -> '.join(e.args[1])}")


def test_folder_inits_only_describe_their_folder() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init}: say in a docstring what the folder offers"
        imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not imports, f"{init}: no re-exports; import from the module that defines it"


def test_client_imports_the_standard_library_only() -> None:
    client = Path(JAX_FREE)
    modules = {m.split(".")[0] for _, m in imported_modules(client, (PACKAGE / client).read_text())}
    assert modules <= set(sys.stdlib_module_names), sorted(modules - set(sys.stdlib_module_names))


def command_paths(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    paths = [" ".join(path)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, [*path, name])
    return paths


def test_the_command_tree_is_unchanged() -> None:
    assert command_paths(cli.build_parser(), ["jaxrm"]) == COMMANDS
