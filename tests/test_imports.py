"""Every public module imports first in a fresh interpreter (no import cycles that only other import orders hide), and
the import graph of spark3r/, read from the source, has no cycle and points down the floors."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

MODULES = ["spark3r", "spark3r.schedule", "spark3r.reduce", "spark3r.reduce.flops", "spark3r.models.registry",
           "spark3r.data", "spark3r.evaluate.schedule_eval", "spark3r.commands.profile_layers",
           "spark3r.commands.search_schedule", "spark3r.commands.make_clips", "spark3r.commands.evaluate_schedule",
           "spark3r.commands.rule_schedule", "spark3r.commands.train_tiny"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_on_its_own(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]


PACKAGE = Path(__file__).resolve().parent.parent / "spark3r"
# floors from the ground up: a module imports only modules of its own floor or below
FLOORS = [("spark3r.errors", "spark3r.files"), ("spark3r.data",), ("spark3r.models",), ("spark3r.reduce",),
          ("spark3r.schedule",), ("spark3r.evaluate",), ("spark3r.profiler", "spark3r.training"), ("spark3r.search",),
          ("spark3r.commands",)]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The spark3r modules `path` imports (anywhere in the file, type-checking imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}


def floor_of(module: str) -> int | None:
    return next((level for level, prefixes in enumerate(FLOORS)
                 if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)), None)


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk of `graph` closes, as "a -> b -> a"."""
    state, found = {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def folder(module: str) -> str:
    """spark3r.reduce.patch -> spark3r.reduce; spark3r.schedule -> spark3r.schedule."""
    return ".".join(module.split(".")[:2])


def test_import_graph_has_no_cycle_between_modules_or_folders():
    graph = import_graph()
    assert not cycles(graph), cycles(graph)
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        folders.setdefault(folder(module), set()).update(folder(target) for target in targets
                                                         if folder(target) != folder(module))
    assert not cycles(folders), cycles(folders)


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_point_down_the_floors():
    graph = import_graph()
    unplaced = [module for module in graph if floor_of(module) is None]
    assert unplaced == ["spark3r"], unplaced
    upward = [f"{module} -> {target}" for module, targets in graph.items() if module not in unplaced
              for target in targets if target != "spark3r" and (floor_of(target) or 0) > floor_of(module)]
    assert not upward, upward


def test_models_import_only_models_and_the_ground_floor():
    allowed = {floor_of("spark3r.errors"), floor_of("spark3r.models")}
    reaching = [f"{module} -> {target}" for module, targets in import_graph().items()
                if floor_of(module) == floor_of("spark3r.models") for target in targets
                if floor_of(target) not in allowed]
    assert not reaching, reaching


def test_nothing_imports_the_package_face_or_the_commands_from_below():
    graph = import_graph()
    assert not [module for module, targets in graph.items() if "spark3r" in targets]
    assert not [module for module, targets in graph.items() if floor_of(module) != floor_of("spark3r.commands")
                and any(floor_of(target) == floor_of("spark3r.commands") for target in targets)]


def test_the_floor_test_sees_an_upward_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from spark3r.schedule import Schedule\nif True:\n    import spark3r.commands.arguments\n")
    assert imported_modules(source, {"spark3r.schedule", "spark3r.commands.arguments"}) == \
        {"spark3r.schedule", "spark3r.commands.arguments"}
    assert floor_of("spark3r.models.vggt") < floor_of("spark3r.schedule") < floor_of("spark3r.commands.arguments")
