"""The layout of the repository (CONTRACT.md): util/ holds helpers only, so it imports nothing from the packages
and applications that stand on it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the top-level modules and packages util/ must not import, at module level or inside a function
ABOVE_UTIL = {"models", "datasets", "d2", "tools", "hubconf", "main", "engine", "run_with_submitit"}


def imported_modules(path: Path) -> list:
    """(line, module) of every import in ``path``, wherever it is (functions and conditionals included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, inside util/ itself
                out.append((node.lineno, "util." + (node.module or "")))
            else:
                out.append((node.lineno, node.module))
    return sorted(out)


def test_imported_modules_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import os\n\ndef f():\n    from models.detr import DETR\n    import hubconf as h\n")
    assert imported_modules(source) == [(1, "os"), (4, "models.detr"), (5, "hubconf")]


def test_util_imports_nothing_from_above():
    files = sorted((ROOT / "util").glob("*.py"))
    assert files, "no util/*.py found"
    upward = [f"util/{f.name}:{line} imports {module}" for f in files for line, module in imported_modules(f)
              if module.split(".")[0] in ABOVE_UTIL]
    assert not upward, "util/ holds helpers only (CONTRACT.md); move these up, e.g. to tools/:\n" + "\n".join(upward)
