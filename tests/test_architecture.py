"""The package's shape: every import points down the layers, no modules import each other round a
circle (inside a package either), commands start fast.

Layers (a package may import its own modules and those of lower layers only)::

    0  errors, loss, assets              plain Python / torch; the files the package ships
    1  config, platform                  the schema; CPU layer, console, one-rank work
    2  core, data, tracking              model + checkpoint layout; SFT data; trackers, reports
    3  hf, planning                      Hugging Face <-> Megatron; the memory planner
    4  engine, rl, evaluation            the trainer; the RL hand-off; sampling and metrics
    5  demo                              the arithmetic world and the embedded default job
    6  commands                          ``megatron-gift`` and its subcommands
    7  convert, rl_handoff, inspect,     ``python -m`` aliases of the subcommands
       plan, evaluate

Nothing in the package imports ``examples/`` or ``tests/``.
"""

import ast
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "megatron_gift")
LAYERS = {"errors": 0, "loss": 0, "assets": 0, "config": 1, "platform": 1, "core": 2, "data": 2,
          "tracking": 2, "hf": 3, "planning": 3,
          "engine": 4, "rl": 4, "evaluation": 4, "demo": 5, "commands": 6, "convert": 7,
          "rl_handoff": 7, "inspect": 7, "plan": 7, "evaluate": 7}


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, REPO), path


def _part(relpath):
    """The top-level unit (sub-package or module) a file of the package belongs to."""
    inside = relpath.split(os.sep)[1:]
    return inside[0].removesuffix(".py")


def _imports(path):
    """Every module name imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}: relative import of {node.module}; use absolute")
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def upward_imports():
    bad = []
    for relpath, path in _modules():
        part = _part(relpath)
        if part == "__init__":
            continue
        level = LAYERS[part]
        for name in _imports(path):
            pieces = name.split(".")
            if pieces[0] in ("examples", "tests"):
                bad.append(f"{relpath} imports {name}")
            if pieces[0] != "megatron_gift" or len(pieces) < 2 or pieces[1] not in LAYERS:
                continue
            if pieces[1] != part and LAYERS[pieces[1]] >= level:
                bad.append(f"{relpath} (layer {level}) imports {name} (layer {LAYERS[pieces[1]]})")
    return bad


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(relpath) for relpath, _ in _modules()} - {"__init__"}
    assert parts <= set(LAYERS), f"give {sorted(parts - set(LAYERS))} a layer in LAYERS"


def test_imports_only_point_down():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """A data module importing the engine is reported (the check can fail)."""
    planted = os.path.join(PACKAGE, "data", "_planted_upward_import.py")
    with open(planted, "w") as f:
        f.write("def f():\n    from megatron_gift.engine import trainer\n")
    try:
        assert upward_imports() == [
            "megatron_gift/data/_planted_upward_import.py (layer 2) imports "
            "megatron_gift.engine (layer 4)",
            "megatron_gift/data/_planted_upward_import.py (layer 2) imports "
            "megatron_gift.engine.trainer (layer 4)"]
    finally:
        os.remove(planted)


def _package_sources() -> dict:
    """Module name (``megatron_gift.loss.gift``; a package by its own name) -> source text."""
    sources = {}
    for relpath, path in _modules():
        name = relpath[:-3].replace(os.sep, ".").removesuffix(".__init__")
        with open(path) as f:
            sources[name] = f.read()
    return sources


def module_imports(sources: dict) -> dict:
    """Module -> the package's modules it imports, function-level imports included (``from P
    import m`` counts the module ``P.m`` where there is one, else ``P``)."""
    graph = {}
    for name, text in sources.items():
        targets = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    whole = f"{node.module}.{alias.name}"
                    targets.add(whole if whole in sources else node.module)
        graph[name] = {t for t in targets if t in sources and t != name}
    return graph


def import_circles(graph: dict) -> list:
    """The sets of modules that import each other round a circle (strongly connected
    components of more than one module), each sorted."""
    order, low, stack, circles = {}, {}, [], []

    def visit(module):
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return sorted(circles)


def test_no_module_imports_round_a_circle():
    """Inside a package too: modules that need each other belong together, or one of them
    holds what both need (the loss's statistics columns in loss/columns.py)."""
    assert import_circles(module_imports(_package_sources())) == []


def test_the_check_catches_an_import_circle():
    sources = _package_sources()
    sources["megatron_gift.loss.columns"] += "\ndef f():\n    from megatron_gift.loss import eager\n"
    assert import_circles(module_imports(sources)) == [
        ["megatron_gift.loss.columns", "megatron_gift.loss.eager"]]


@pytest.mark.system  # a fresh interpreter is the only one that has imported nothing
@pytest.mark.parametrize("command", [
    [os.path.join("examples", "pretrain_gift.py"), "--help"],
    ["-m", "megatron_gift.convert", "--help"],
    ["-m", "megatron_gift.rl_handoff", "--help"],
    ["-m", "megatron_gift.inspect", "--help"],
    ["-m", "megatron_gift.plan", "--help"],
    ["-m", "megatron_gift.evaluate", "--help"],
    ["-m", "megatron_gift.commands", "--help"],
    *(["-m", "megatron_gift.commands", name, "--help"] for name in (
        "train", "convert", "inspect", "plan", "evaluate", "rl-handoff", "report")),
])
def test_help_starts_without_torch_or_megatron(command):
    """``--help`` imports neither torch nor Megatron-Core (what made it take 12-15 s)."""
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
             "target = sys.argv[0]\n"
             "try:\n"
             "    runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True) "
             "if target == '-m' else runpy.run_path(target, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    assert e.code in (0, None), e.code\n"
             "heavy = sorted(m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe, *command], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []", elapsed
