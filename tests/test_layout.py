"""The library's shape, as the stage registry and the import rules promise it (issue 16): scripts import
only the library, no module reaches into another's private names, and every stage kind's script exists."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO, SCRIPTS

from trellis.stages import STAGES

SOURCES = sorted((REPO / "src" / "trellis").rglob("*.py")) + sorted(SCRIPTS.glob("*.py"))


def imports(path: Path) -> list[ast.ImportFrom]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)]


def test_no_module_imports_another_modules_private_names():
    crossings = [
        f"{path.relative_to(REPO)}:{node.lineno}: {alias.name} from {node.module}"
        for path in SOURCES
        for node in imports(path)
        if (node.module or "").startswith("trellis")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")  # not __version__
    ]
    assert not crossings, crossings


def test_scripts_import_the_library_not_each_other():
    names = {path.stem for path in SCRIPTS.glob("*.py")}
    crossings = [
        f"{path.name}:{node.lineno}: from {node.module}"
        for path in SCRIPTS.glob("*.py")
        for node in imports(path)
        if node.module in names
    ]
    assert not crossings, crossings


def test_every_stage_kind_has_its_script():
    for name, kind in STAGES.items():
        if kind.script is not None:
            assert (SCRIPTS / kind.script).is_file(), f"{name}: scripts/{kind.script}"
