"""The import graph of the project's own modules (decipher_jax/, data_prep/), read with ``ast``:
no cycles, evaluation / zero-shot / AOT / report independent of the trainers, models free of
the weight converters. Module-level and function-level imports count alike."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("decipher_jax", "data_prep")

# Modules that must not depend on the trainers, directly or through other project modules.
TRAINER_FREE = ("decipher_jax.eval", "decipher_jax.zeroshot", "decipher_jax.aot", "decipher_jax.report",
                "decipher_jax.runs", "decipher_jax.state", "decipher_jax.env", "decipher_jax.inference",
                "decipher_jax.bundle")


def _modules() -> dict[str, tuple[str, bool]]:
    """``{module name: (path, is_package)}`` of every .py file under the project packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for f in sorted(filenames):
                if not f.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(dirpath, f), ROOT)[: -len(".py")].split(os.sep)
                is_pkg = parts[-1] == "__init__"
                out[".".join(parts[:-1] if is_pkg else parts)] = (os.path.join(dirpath, f), is_pkg)
    return out


def _imported(name: str, is_pkg: bool, tree: ast.AST, known: set[str]) -> set[str]:
    """Project modules ``tree`` (module ``name``) imports anywhere (``from pkg import mod`` -> pkg.mod)."""
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()

    def project(mod: str) -> str | None:
        """``mod`` or its longest prefix that is a project module."""
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out |= {t for t in map(project, targets) if t and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    g = {}
    for name, (path, is_pkg) in mods.items():
        with open(path, encoding="utf-8") as f:
            g[name] = _imported(name, is_pkg, ast.parse(f.read(), filename=path), known)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path a -> ... -> a) per strongly connected component with more than one module."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan, recursive: the graph has a few hundred nodes at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:
        start = min(comp)
        cycles.append(_path(g, start, start, comp))
    return cycles


def _path(g, src: str, dst: str, within=None) -> list[str] | None:
    """Shortest import path src -> ... -> dst (src == dst: a cycle), optionally inside ``within``."""
    frontier, parent = [src], {}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if within is not None and w not in within:
                    continue
                if w == dst:
                    path = [w, v]
                    while path[-1] != src:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if w not in parent and w != src:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return None


def _reachable(g, src: str) -> dict[str, list[str]]:
    """Every module ``src`` imports transitively, with one import path to it."""
    paths, frontier = {src: [src]}, [src]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    del paths[src]
    return paths


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(g, sources, forbidden: str) -> list[str]:
    """Import paths from a module under one of ``sources`` into the ``forbidden`` package (each
    path up to its first forbidden module)."""
    out = []
    for name in sorted(g):
        if any(_under(name, p) for p in sources):
            out += [" -> ".join(path) for dep, path in _reachable(g, name).items()
                    if _under(dep, forbidden) and not _under(path[-2], forbidden)]
    return out


def test_the_walker_sees_module_and_function_level_imports():
    g = graph()
    assert {"decipher_jax.cli", "decipher_jax.eval.suite", "data_prep.prep"} <= set(g)
    assert "decipher_jax.sharding" in g["decipher_jax.state"]  # module level, `from decipher_jax import sharding`
    assert "decipher_jax.demo" in g["decipher_jax.cli"]  # function level, inside _demo
    assert "decipher_jax.runs" in g["decipher_jax.zeroshot"]  # function level, in a classmethod
    assert "decipher_jax.interop.common" in g["decipher_jax.interop.hf_bert"]
    assert "data_prep.volume" in g["data_prep.prep"]


def test_relative_and_from_imports_resolve_to_modules():
    known = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"}
    # In module pkg.sub.d: a sibling, a parent's module, a name from a module, a function-level import.
    src = "from . import c\nfrom .. import a\nfrom ..b import x\ndef f():\n    import pkg.sub\n"
    assert _imported("pkg.sub.d", False, ast.parse(src), known) == {"pkg.sub.c", "pkg.a", "pkg.b", "pkg.sub"}
    # In a package's __init__, "." is the package itself.
    assert _imported("pkg", True, ast.parse("from .sub import c\nfrom . import b\n"), known) == {"pkg.sub.c", "pkg.b"}
    # Third-party modules are not nodes of the graph.
    assert _imported("pkg.a", False, ast.parse("import numpy as np\nfrom jax import numpy\n"), known) == set()


def test_no_import_cycles():
    cycles = _cycles(graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_evaluation_zeroshot_aot_report_do_not_import_the_trainers():
    bad = _violations(graph(), TRAINER_FREE, "decipher_jax.trainers")
    assert not bad, "trainer imports from evaluation-side modules:\n" + "\n".join(bad)


def test_models_do_not_import_interop():
    bad = _violations(graph(), ("decipher_jax.models",), "decipher_jax.interop")
    assert not bad, "models importing the weight converters:\n" + "\n".join(bad)
