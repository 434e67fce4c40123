"""The shape of the package that a new reader relies on: no import cycles, a training loop read in one sitting."""

from __future__ import annotations

import ast
import os

import ddpm_hf

PACKAGE_DIR = os.path.dirname(ddpm_hf.__file__)


def package_imports() -> dict[str, set[str]]:
    """module -> the ddpm_hf modules it imports, at the top or inside functions (relative or absolute)."""
    graph: dict[str, set[str]] = {}
    for name in sorted(os.listdir(PACKAGE_DIR)):
        if not name.endswith(".py"):
            continue
        module = name[:-3]
        tree = ast.parse(open(os.path.join(PACKAGE_DIR, name)).read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    targets.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import data
                    targets.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("ddpm_hf."):
                    targets.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                targets.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ddpm_hf."))
        graph[module] = {t for t in targets if t != module and os.path.isfile(os.path.join(PACKAGE_DIR, f"{t}.py"))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_inside_the_package():
    graph = package_imports()
    assert {"training", "run_folder", "sampling", "visualize"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_library_modules_never_import_training_or_cli():
    """ddpm_hf/DESIGN: data, config, evaluation, sampling, hub and visualize never import training or cli."""
    graph = package_imports()
    for module, targets in graph.items():
        if module not in ("training", "cli", "__main__"):
            assert not targets & {"training", "cli"}, f"{module} imports {targets & {'training', 'cli'}}"
    assert graph["run_folder"] <= {"files"} and graph["files"] == set()  # everyone may use them, so they use no one else


def test_train_reads_in_one_sitting():
    """train() is short and has no closures; the per-step upkeep is decided in one function with one `due` rule."""
    source = open(os.path.join(PACKAGE_DIR, "training.py")).read()
    tree = ast.parse(source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    train = functions["train"]
    assert train.end_lineno - train.lineno + 1 <= 100
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Nonlocal)]
    for function in functions.values():
        nested = [node.name for node in ast.walk(function) if isinstance(node, ast.FunctionDef) and node is not function]
        assert not nested, f"{function.name} defines {nested} inside it"
    # Every "is it time?" test on the step count goes through due(); _step_seed only mixes the step into a seed.
    allowed = [functions["due"], functions["_step_seed"]]
    modulo_on_step = [node for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and "step" in ast.unparse(node.left)]
    outside = [ast.unparse(n) for n in modulo_on_step if not any(f.lineno <= n.lineno <= f.end_lineno for f in allowed)]
    assert not outside, outside
