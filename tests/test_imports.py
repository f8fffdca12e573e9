"""The package's import structure: no import cycle between blockops' modules, and every module imports on its own.

The graph holds the imports a module runs when it is imported (module level, class bodies, ``if`` / ``try``
blocks; not function bodies, not ``if TYPE_CHECKING:``). Importing ``a.b.c`` also runs the packages ``a.b`` and
``a`` first, so an edge to ``a.b.c`` is also an edge to ``a.b`` (unless the importer sits inside ``a.b``: its own
packages are already being imported when it runs). A cycle in this graph is an import that works or fails depending
on which module a program imports first.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import blockops

PACKAGE_DIR = os.path.dirname(os.path.abspath(blockops.__file__))
PYTHON_DIR = os.path.dirname(PACKAGE_DIR)


def _modules() -> dict[str, str]:
    """Module name -> file, for every .py file under the blockops package (a package's name is its __init__)."""
    modules = {}
    for dirpath, dirnames, filenames in os.walk(PACKAGE_DIR):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(dirpath, filename), PYTHON_DIR)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = os.path.join(dirpath, filename)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_nodes(body):
    """The import statements that run when the module is imported (not those inside functions)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time_nodes(node.body)
            yield from _import_time_nodes(node.orelse)
        elif isinstance(node, ast.ClassDef):
            yield from _import_time_nodes(node.body)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _import_time_nodes(getattr(node, field, []))
            for case in getattr(node, "cases", []):   # match statements
                yield from _import_time_nodes(case.body)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> the blockops modules importing it runs (see the module docstring)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = os.path.basename(path) == "__init__.py"
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in _import_time_nodes(tree.body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
        own = set(_ancestors(name))
        edges = set()
        for target in targets:
            if target != "blockops" and not target.startswith("blockops."):
                continue
            edges.update(p for p in _ancestors(target) if p not in own)
            edges.add(target)
        edges.discard(name)
        graph[name] = {e for e in edges if e in modules}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_follows_packages_and_skips_function_bodies():
    graph = import_graph()
    assert "blockops.ops" in graph["blockops"]                       # from blockops import ops
    assert "blockops.ops" in graph["blockops.nn.quant_linear"]       # blockops.ops.<family> runs blockops.ops first
    assert all(not e.startswith("blockops.bench") for e in graph["blockops.__main__"])   # imported in main() only


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle between blockops modules: " + " -> ".join(cycle)


# Each module is imported in a process of its own, forked from one that has loaded torch (the slow part) but no
# blockops module, so a module that only imports after another has been imported fails here.
_FORK_DRIVER = r"""
import importlib, json, os, sys, traceback
import torch, torch._dynamo   # third-party only: every child starts without any blockops module
failures = {}
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    if status:
        failures[name] = err or f"exit status {status}"
print(json.dumps(failures))
"""


def test_every_module_imports_in_a_fresh_process():
    names = sorted(_modules())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PYTHON_DIR, os.environ.get("PYTHONPATH")) if p))
    if hasattr(os, "fork"):
        res = subprocess.run([sys.executable, "-c", _FORK_DRIVER, *names], env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        failures = json.loads(res.stdout.strip().splitlines()[-1])
    else:   # no fork: one interpreter per module
        failures = {}
        for name in names:
            res = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
            if res.returncode:
                failures[name] = res.stderr
    assert not failures, "\n\n".join(f"{name}:\n{err[-3000:]}" for name, err in failures.items())
