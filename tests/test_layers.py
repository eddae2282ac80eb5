"""The package's layers (thermodiff/__init__.py): no module imports from a layer listed after its own."""

import ast
from pathlib import Path

import thermodiff

PACKAGE = Path(thermodiff.__file__).parent
LAYERS = ["errors", "process", "data", "nets", "run", "tasks", "cli"]


def layer_of(module: str) -> int:
    """The layer index of a dotted module under thermodiff (``thermodiff.run.config`` -> run)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def imported_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] if node.module != "thermodiff" else [f"thermodiff.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m.startswith("thermodiff.")]


def test_every_module_belongs_to_a_layer():
    top_level = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top_level - {"__init__", "__main__"} == set(LAYERS)


def test_no_module_imports_from_a_later_layer():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = "thermodiff." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = layer_of(module)
        upward += [f"{module} imports {m}" for m in imported_modules(path) if layer_of(m) > own >= 0]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from thermodiff.run.config import Config\nfrom thermodiff import cli\n")
    assert [layer_of(m) for m in imported_modules(path)] == [LAYERS.index("run"), LAYERS.index("cli")]
