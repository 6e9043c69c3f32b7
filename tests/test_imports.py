"""No circles between coin's files: the import graph of the top-level modules (every import, function-level ones
included, read with ast) has no cycle, and training (coin.py) loads neither the study nor the CoIN-mini generator."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f.removesuffix(".py") for f in os.listdir(ROOT) if f.endswith(".py"))
# imports that still close a cycle, each to be removed with the change that breaks it
CYCLE_ALLOWLIST = set()


def imports_of(module):
    """The top-level modules `module` imports anywhere in its file (module level, in functions, `from X import`)."""
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES) - {module}


def reachable(graph, start):
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_no_two_modules_import_each_other():
    graph = {m: imports_of(m) - {b for a, b in CYCLE_ALLOWLIST if a == m} for m in MODULES}
    assert {"coin", "data", "eval", "study", "coin_mini"} <= set(MODULES)
    pairs = sorted((a, b) for a in MODULES for b in graph[a] if a < b and a in graph[b])
    assert pairs == [], f"modules that import each other: {pairs}"
    cycles = sorted(m for m in MODULES if m in reachable(graph, m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_training_loads_neither_the_study_nor_the_generator():
    """Not through any import in any function (read from the files), and not in a fresh process importing coin."""
    graph = {m: imports_of(m) for m in MODULES}
    assert reachable(graph, "coin") & {"study", "coin_mini"} == set()
    assert imports_of("study") >= {"eval"} and imports_of("coin_mini") >= {"data"}  # the other way round they do
    code = "import sys, coin; print(sorted(m for m in ('study', 'coin_mini') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "[]"
