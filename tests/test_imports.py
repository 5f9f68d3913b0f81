"""The import graph of surf_train: no cycle, and subpackages that import only downward (docs/architecture.md)."""

import ast
import re
import sys
from pathlib import Path

import surf_train

ROOT = Path(surf_train.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the surf_train modules it imports, at module level or inside functions alike (either can close a
    circle at run time). `from pkg import name` points at the submodule pkg.name where there is one, else at pkg.
    The implicit import of a module's parent packages is not counted: every package __init__ would close one."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_graph_sees_function_level_imports():
    g = import_graph()
    assert "surf_train.base.adapter" in g["surf_train.base.wan"]  # module level
    assert "surf_train.base.toy_vae" in g["surf_train.base.vae"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def allowed_imports() -> dict[str, set[str]]:
    """Subpackage -> the subpackages it may import, as its __init__ docstring's "May import `a`, `b`..." says."""
    out = {}
    for init in sorted(ROOT.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        m = re.search(r"May import (.*?)(?:;|\.$|\.\s)", doc, re.S)
        assert m, f"{init.relative_to(ROOT.parent)}: the docstring does not say what the package may import"
        out[init.parent.name] = set(re.findall(r"`(\w+)`", m.group(1)))
    return out


def test_subpackages_import_only_downward_and_nothing_private():
    """A subpackage imports only the subpackages its docstring allows (never a top-level command module), and no
    private name (`_x`) of another subpackage; the allowed graph itself has no circle."""
    allowed = allowed_imports()
    assert len(allowed) >= 4 and find_cycle({k: v & set(allowed) for k, v in allowed.items()}) is None
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if len(parts) == 1:  # top-level command modules may import any subpackage
            continue
        pkg = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("surf_train."):
                continue
            target = node.module.split(".")[1]
            where = f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}"
            if target == pkg:
                continue
            if target not in allowed:
                bad.append(f"{where} (a top-level command module)")
            elif target not in allowed[pkg]:
                bad.append(f"{where} ({pkg} may import {sorted(allowed[pkg])})")
            bad += [f"{where} (private name {a.name})" for a in node.names if a.name.startswith("_")]
    assert not bad, "\n".join(bad)


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check above fails on a module of `base` that imports `training`."""
    import shutil

    fake = tmp_path / "surf_train"
    for init in ROOT.glob("*/__init__.py"):
        (fake / init.parent.name).mkdir(parents=True)
        shutil.copy(init, fake / init.parent.name / "__init__.py")
    (fake / "base" / "bad.py").write_text("from surf_train.training.module import RefinerModule\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    try:
        test_subpackages_import_only_downward_and_nothing_private()
    except AssertionError as e:
        assert "base/bad.py:1 imports surf_train.training.module" in str(e)
    else:
        raise AssertionError("an upward import passed the layer check")
