"""The layer rule of docs/architecture.md, enforced on every import in the source tree.

Lower layers never import higher ones; siblings of one rank never import each other;
``flexfed.client`` and ``flexfed.server`` never import each other; nothing in
``flexfed.common`` imports either. Every import counts: module level, inside functions and
under ``TYPE_CHECKING`` (a cycle hidden there is still a cycle), and no module imports itself
back through others.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package -> rank: a module may import only from its own package or from lower ranks.
LAYERS: dict[str, int] = {
    "flexfed.common.errors": 0,
    "flexfed.common": 0,  # the package itself (__version__)
    "flexfed.proto": 1,
    "flexfed.common.util": 1,
    "flexfed.common.formats": 2,
    "flexfed.common.data": 3,
    "flexfed.common.translog": 3,
    "flexfed.common.moe": 4,
    "flexfed.common.public": 5,
    "flexfed.common.trust": 5,
    "flexfed.common.flower": 6,
    "flexfed.common.api": 6,
    "flexfed.common.serving": 6,
    "flexfed.common.cli": 7,
    "flexfed.client": 8,
    "flexfed.server": 8,
}
SOURCES = {"common": "flexfed.common", "client": "flexfed.client", "server": "flexfed.server"}


def layer_of(module: str) -> str:
    """The longest LAYERS key that is ``module`` or a package above it."""
    best = ""
    for name in LAYERS:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    if not best:
        raise AssertionError(f"{module} is in no layer; add its package to LAYERS")
    return best


def module_name(root: Path, folder: str, path: Path) -> str:
    rel = path.relative_to(root / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([SOURCES[folder], *parts])


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every flexfed import in ``path``, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            # `from flexfed.common.x import y` may import the submodule y.
            found += [(node.lineno, base)]
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.startswith("flexfed.")]


def source_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for folder in SOURCES:
        for path in sorted((root / folder).rglob("*.py")):
            modules[module_name(root, folder, path)] = path
    return modules


def violations(root: Path) -> list[str]:
    modules = source_modules(root)
    known = set(modules) | {"flexfed.proto"}
    problems = []
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        mine = layer_of(module)
        for line, target in imports_of(path, module):
            if target not in modules and not target.startswith("flexfed.proto"):
                if target.rpartition(".")[0] in known:
                    continue  # `from pkg import name` where name is not a module
                problems.append(f"{path}:{line}: imports {target}, which does not exist")
                continue
            if target.startswith("flexfed.proto"):
                theirs = "flexfed.proto"
            else:
                theirs = layer_of(target)
                graph.setdefault(module, set()).add(target)
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                problems.append(
                    f"{path}:{line}: {module} ({mine}, rank {LAYERS[mine]}) imports {target} "
                    f"({theirs}, rank {LAYERS[theirs]}): only lower layers may be imported"
                )
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_tree_keeps_the_layer_order() -> None:
    assert violations(REPO) == []


@pytest.mark.parametrize(
    ("where", "planted", "expected"),
    [
        # a format reaching up into the method
        ("common/formats/anchor.py", "from flexfed.common.moe.assembly import assemble", "rank 2"),
        # common reaching into a side
        ("common/moe/optout.py", "from flexfed.client.trainer import train_expert", "rank 4"),
        # the two sides importing each other, even inside a function
        ("client/cli.py", "def f():\n    import flexfed.server.app", "rank 8"),
        # siblings of one rank
        ("common/trust/pki.py", "from flexfed.common.public.tiny import build_anchor", "rank 5"),
        # a cycle hidden under TYPE_CHECKING
        (
            "common/formats/checkpoint.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from flexfed.common.formats.anchor import Anchor",
            "import cycle",
        ),
    ],
)
def test_a_planted_violation_is_caught(
    tmp_path: Path, where: str, planted: str, expected: str
) -> None:
    for folder in SOURCES:
        shutil.copytree(
            REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    target = tmp_path / where
    target.write_text(target.read_text() + "\n\n" + planted + "\n")
    found = violations(tmp_path)
    # An upward import may also close a cycle; the planted line itself must be named.
    named = [v for v in found if expected in v and (where in v or expected == "import cycle")]
    assert named, found
