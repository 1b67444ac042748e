"""The package's shape: imports point one way (DESIGN.md's layers), no cycles, nothing below the demo
imports it, no module reaches into another's private names, and every module states its job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "longrope_jax"

# Lowest first. A module may import its own layer or a lower one, never a higher one.
LAYERS = (
    ("rope", "platform", "sharding.rules", "attention"),
    ("model",),
    ("sharding", "io", "loss"),
    ("data",),
    ("train", "search", "eval", "generate"),
    ("stages", "extend", "aot"),
    ("demo", "cli", "__main__"),
)


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name: file} of every module; a package is named by its __init__."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(path: Path, known: dict) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for each import of the package, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("longrope_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in known else (node.module, alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append(("<relative>", "", node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("longrope_jax")]
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = module_files(package)
    return {m: {t for t, _, _ in imports_of(p, mods) if t in mods and t != m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state, path = {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = "done"
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def layer_of(module: str) -> int:
    if module == "longrope_jax":
        return 0  # the top package holds only its version
    name = module.removeprefix("longrope_jax.")
    best = None
    for i, members in enumerate(LAYERS):
        for m in members:
            if name == m or name.startswith(m + "."):
                if best is None or len(m) > len(best[1]):
                    best = (i, m)
    if best is None:
        raise AssertionError(f"{module}: in no layer of tests/test_layout.py's LAYERS; add it there")
    return best[0]


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "longrope_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""p"""\n')
    (pkg / "sub" / "__init__.py").write_text('"""p"""\n')
    (pkg / "a.py").write_text("from longrope_jax.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from longrope_jax.c import x\n")
    (pkg / "c.py").write_text("from longrope_jax import a\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"longrope_jax.a", "longrope_jax.sub.b", "longrope_jax.c"}


def test_imports_point_down_the_layers():
    mods = module_files()
    wrong = []
    for m, path in mods.items():
        for target, _, line in imports_of(path, mods):
            assert target != "<relative>", f"{path}:{line}: relative import; the package imports absolutely"
            if target in mods and layer_of(target) > layer_of(m):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "imports against the layering (see LAYERS):\n" + "\n".join(wrong)


def test_nothing_outside_demo_imports_demo():
    mods = module_files()
    for m, path in mods.items():
        if m.startswith("longrope_jax.demo") or m in ("longrope_jax.cli", "longrope_jax.__main__"):
            continue
        for target, _, line in imports_of(path, mods):
            assert not target.startswith("longrope_jax.demo"), f"{path}:{line}: the core imports {target}"


@pytest.mark.parametrize("root", ["longrope_jax", "tests", "benchmarks"])
def test_no_module_imports_a_private_name(root):
    base = PACKAGE.parent / root
    mods = module_files()
    wrong = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {target}.{name}"
             for p in sorted(base.rglob("*.py")) for target, name, line in imports_of(p, mods)
             if name.startswith("_") and not name.startswith("__")]
    assert not wrong, "\n".join(wrong)


def test_every_module_states_its_job_in_a_docstring():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in module_files().values()
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


def test_every_module_is_in_a_layer():
    for m in module_files():
        layer_of(m)
