"""Imports run one way, room by room (docs/architecture.md): base <- model <- TED patches <- data <-
checkpoint <- training <- plan <- convert <- launch <- cli <- entry points.

Every import statement of every library file is read (function-level imports included), so a lazy
import cannot hide an upward arrow.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first; a file may import its own layer and those below it.
LAYERS = [
    ("base", "megatron.parallel"),
    ("model", "megatron.model"),
    ("patches", "ted_patches"),
    ("data", "megatron.data"),
    ("checkpoint", "megatron.checkpoint"),
    ("training", "megatron.training"),
    ("plan", "megatron.plan"),
    ("convert", "megatron.convert"),
    ("launch", "megatron.launch"),
    ("cli", "megatron.cli"),
]
ENTRY_POINTS = ["pretrain_gpt_moe", "tools", "bench"]


def layer_of(module: str):
    """Index of the layer a dotted module name belongs to; None for everything else (torch,
    megatron.core, the standard library)."""
    for i, (_, package) in enumerate(LAYERS):
        if module == package or module.startswith(package + "."):
            return i
    if module.split(".")[0] in ENTRY_POINTS or module in ("tests", "harness", "util"):
        return len(LAYERS)
    return None


def imported_modules(path: str):
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def library_files(package: str):
    folder = os.path.join(ROOT, *package.split("."))
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


@pytest.mark.parametrize("index,name,package", [(i, n, p) for i, (n, p) in enumerate(LAYERS)])
def test_no_import_runs_upward(index, name, package):
    files = list(library_files(package))
    assert files, f"{package} has no files"
    upward = []
    for path in files:
        for module in imported_modules(path):
            target = layer_of(module)
            if target is not None and target > index:
                upward.append(f"{os.path.relpath(path, ROOT)} imports {module} "
                              f"({LAYERS[target][0] if target < len(LAYERS) else 'entry points'})")
    assert not upward, (f"{name} must not import a layer above it:\n"
                        + "\n".join(sorted(set(upward))))


def test_the_library_holds_no_test_harness():
    for _, package in LAYERS:
        for path in library_files(package):
            text = open(path).read()
            assert "forkserver" not in text and "import pytest" not in text, path


def test_the_detector_sees_an_upward_import(tmp_path):
    """The check itself: a model file importing the patches (even inside a function) is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ted_patches.router import Router\n")
    assert [layer_of(m) for m in imported_modules(str(bad))] == [2, 2]


def test_every_library_file_lives_in_a_room():
    """A new folder under megatron/ must be placed in LAYERS (else its imports go unchecked)."""
    rooms = {package.split(".")[1] for _, package in LAYERS if package.startswith("megatron.")}
    found = {name for name in os.listdir(os.path.join(ROOT, "megatron"))
             if os.path.isdir(os.path.join(ROOT, "megatron", name)) and name != "__pycache__"}
    assert found <= rooms, f"megatron/ folders outside LAYERS: {sorted(found - rooms)}"
    assert not [n for n in os.listdir(os.path.join(ROOT, "megatron")) if n.endswith(".py")]
