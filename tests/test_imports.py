"""The import graph of the repository's modules has no circle: every import counted, at module level and inside
functions (a function-level import hides a circle from Python at load time, not from a reader)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def modules(root):
    """{module name: path} for the top-level .py files and the packages (folders with __init__.py) of root."""
    found = {p.stem: p for p in root.glob("*.py")}
    for init in root.glob("*/__init__.py"):
        package = init.parent.name
        found[package] = init
        found.update({f"{package}.{p.stem}": p for p in init.parent.glob("*.py") if p.name != "__init__.py"})
    return found


def imports(name, path, known):
    """The repository modules that module `name` imports anywhere in its file. A package's own submodules do not
    depend on the package's __init__ by being inside it, only by reading names from it (`from . import x`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()

    def add(module, via_parents):
        parts = module.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in known and (i == len(parts) or via_parents) and not (package + ".").startswith(prefix + "."):
                targets.add(prefix)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, via_parents=True)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    add(sub, via_parents=True)
                else:  # a name read from base (its __init__ for a package)
                    if base in known:
                        targets.add(base)
                    add(base, via_parents=True)
    targets.discard(name)
    return targets


def graph(root):
    found = modules(root)
    return {name: imports(name, path, found) for name, path in found.items()}


def circles(edges):
    """Each strongly connected component of more than one module, as a sorted list (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_repository_has_no_import_circle():
    edges = graph(ROOT)
    assert {"adam", "data_prep", "adam_cxr.runs", "adam_ext.selfcheck"} <= set(edges)  # it sees the modules
    assert "adam_cxr.runs" in edges["adam"] and "adam_ext" in edges["adam"]  # and a function-level import
    assert circles(edges) == [], "import circles (break each by moving the shared piece or passing it in)"


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    """The checker itself: a package whose submodules import each other, one of them inside a function, and a
    submodule that reads a name from its package's __init__ (which imports it)."""
    (tmp_path / "top.py").write_text("import pkg.a\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .b import thing\nfrom .c import use\n")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def thing():\n    from . import a\n")
    (tmp_path / "pkg" / "c.py").write_text("def use():\n    from . import thing\n")
    (tmp_path / "pkg" / "d.py").write_text("from . import c\n")       # a submodule: no edge to pkg itself
    edges = graph(tmp_path)
    assert edges["top"] == {"pkg", "pkg.a"} and edges["pkg.d"] == {"pkg.c"} and edges["pkg.c"] == {"pkg"}
    assert sorted(circles(edges)) == [["pkg", "pkg.c"], ["pkg.a", "pkg.b"]]


def test_test_files_share_through_helpers_not_through_each_other():
    """A test file imports helpers.py (its fixtures come from conftest.py), never another test file or conftest."""
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_") or n == "conftest"]
    assert not bad, "move what is shared into tests/helpers.py (functions) or tests/conftest.py (fixtures)"
