"""No import circle among skntk's modules, counting imports inside functions too (issue 26)."""

import ast
from pathlib import Path

import skntk

PACKAGE = Path(skntk.__file__).parent


def module_graph():
    """``{module: set of skntk modules it imports}`` from every import statement, at any depth;
    ``from skntk import ntk`` is an arrow to ``skntk.ntk``, not to the package."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    graph = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    root = package
                    for _ in range(node.level - 1):
                        root = root.rpartition(".")[0]
                    base = f"{root}.{base}" if base else root
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph):
    """One import circle as a list of modules, or None (depth-first search, colours)."""
    colour, stack = {}, []

    def visit(m):
        colour[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if colour.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in colour:
                found = visit(n)
                if found:
                    return found
        colour[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in colour:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = module_graph()
    assert len(graph) > 30 and "skntk.models.predict" in graph["skntk.metrics"]  # it reads
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_importlib_detour():
    """A circle must not be hidden behind importlib (the models' optional backends aside)."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "import_module(" in text:
            assert path.name == "_util.py" and path.parent.name == "models", path


def test_tests_reach_private_sklearn_names_only_through_the_shim():
    """``skntk/_sklearn_compat.py`` is the one place that imports scikit-learn's private API."""
    import re

    private = re.compile(r"from sklearn[\w.]*\._\w+ import|from sklearn[\w.]* import .*\b_\w+|"
                         r"import sklearn[\w.]*\._")
    roots = [PACKAGE, PACKAGE.parent / "tests"]
    offenders = [f"{p}:{n}" for root in roots for p in root.rglob("*.py")
                 if p.name != "_sklearn_compat.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, offenders
