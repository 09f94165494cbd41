"""The package's architecture, checked: which part may import which, and how large a module or function grows.

Lower layers never import higher ones, so each part can be read (and tested) with only what lies below it:
foundations (errors, locks, stats, hub, metrics, run_folder) < config < models < data < core < training | evaluation,
with report beside them reading run folders only, gguf_export on models and data, bench on top of training,
evaluation and gguf_export, and the API and command line (api, results, cli) above all. Imports inside functions
count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smolalign"
FOUNDATIONS = {"errors", "locks", "stats", "hub", "metrics", "run_folder"}
BELOW_CORE = {"foundations", "config", "models", "data"}
MAY_IMPORT = {
    "foundations": {"foundations"},
    "config": {"foundations"},
    "models": {"foundations", "config"},
    "data": {"foundations", "config", "models"},
    "core": BELOW_CORE,
    "training": BELOW_CORE | {"core"},
    "evaluation": BELOW_CORE | {"core"},
    "report": {"foundations", "config"},
    "gguf_export": BELOW_CORE,
    "bench": BELOW_CORE | {"core", "training", "evaluation", "report", "gguf_export"},
}
HEAVY = {"torch", "transformers", "peft", "accelerate", "datasets"}  # what the report must not need
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def part_of(module: str) -> str:
    """'smolalign.core.losses' -> 'core'; top-level foundations -> 'foundations'; the commands -> 'commands'."""
    first = module.split(".")[1]
    if first in FOUNDATIONS:
        return "foundations"
    return first if first in MAY_IMPORT else "commands"


def modules() -> list[tuple[str, Path]]:
    return [(".".join(("smolalign", *path.relative_to(PACKAGE).with_suffix("").parts)), path)
            for path in sorted(PACKAGE.rglob("*.py"))]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_module_belongs_to_a_known_part():
    commands = {module for module, _ in modules() if part_of(module) == "commands"}
    assert commands <= {"smolalign.__init__", "smolalign.__main__", "smolalign.cli", "smolalign.api",
                        "smolalign.results"}, "a new top-level module: give it a part"


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda value: value if isinstance(value, str) else "")
def test_imports_follow_the_layers(module, path):
    part = part_of(module)
    if part == "commands":
        return
    allowed = MAY_IMPORT[part] | {part}
    wrong = sorted(name for name in imports_of(path)
                   if name.startswith("smolalign.") and part_of(name) not in allowed)
    assert not wrong, f"{module} ({part}) may import only {sorted(allowed)}, not {wrong}"
    if part == "report":
        heavy = sorted(name for name in imports_of(path) if name.split(".")[0] in HEAVY)
        assert not heavy, f"{module} reads run folders only; it imports {heavy}"


def test_training_and_evaluation_never_import_each_other():
    for module, path in modules():
        part = part_of(module)
        other = {"training": "evaluation", "evaluation": "training"}.get(part)
        if other:
            assert not any(name.startswith(f"smolalign.{other}") for name in imports_of(path)), module


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda value: value if isinstance(value, str) else "")
def test_modules_and_functions_stay_small(module, path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{module} has over {MAX_MODULE_LINES} lines: split it"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{module}.{node.name} has {length} lines (over {MAX_FUNCTION_LINES})"
